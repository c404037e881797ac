"""Activation checkpointing measured, per arch: memory kept for backward and what backward
recomputes, for ``none`` / ``selective`` / ``full``.

Why the bytes are not counted with ``torch.autograd.graph.saved_tensors_hooks``: a
non-reentrant checkpoint installs its own (innermost) saved-tensor hooks for its region,
so an outer hook never sees what is saved inside a checkpointed block, and selective
checkpointing keeps the outputs it saves in its own cache, not through saved-tensor hooks
at all (:func:`test_saved_tensor_hooks_cannot_see_inside_checkpoints` shows it).  Instead,
:func:`retained_forward_bytes` records, with a ``TorchDispatchMode``, the storage of every
tensor any operator creates during the forward and sums the bytes of those storages still
alive once the forward has returned (after garbage collection).  That is exactly the
memory the forward leaves behind for backward, whoever holds it (autograd's saved
tensors, a checkpoint's inputs, the selective-checkpoint cache); tensors that existed
before the forward (parameters, the batch) are never counted, and views of one storage
are counted once.
"""

from __future__ import annotations

import collections
import gc
from typing import Any

import pytest
import torch
import vlmp_workers as w
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vlm_parallel as vp
from vlm_config import JobConfig
from vlm_strategies import build_vlm, causal_lm_loss

ARCHS = [
    "joint_decoder",
    "cross_attention",
    "mot",
    "moma",
    pytest.param("gated_cross_attention", id="plugin-gated_cross_attention"),
]
MODES = ("none", "selective", "full")

# long enough text that the trunk's activations dominate the kept memory
BATCH, TEXT_LEN, IMAGE_TOKENS, LAYERS = 4, 128, 16, 4


def _require_arch(arch: str) -> None:
    if arch == "gated_cross_attention":
        pytest.importorskip(
            "vlm_plugin_resampler",
            reason="the example plugin (examples/plugins/vlm-plugin-resampler) is not installed",
        )


def memory_job(arch: str) -> JobConfig:
    data = w.tiny_job_dict(arch)
    data["model"] = {**data["model"], "dim": 64, "n_layers": LAYERS, "max_seq_len": 256}
    data["encoder"] = {**data["encoder"], "num_tokens": IMAGE_TOKENS}
    data["arch"] = {**data["arch"], "max_text_len": TEXT_LEN}
    return JobConfig.model_validate(data)


def build(job: JobConfig, mode: str) -> torch.nn.Module:
    """The same weights for every mode; every parameter moved off its initial value so that
    zero-initialised output projections and gates (cross-attention blocks) do not make
    whole branches' gradients trivially zero."""
    torch.manual_seed(0)
    model = build_vlm(job)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    vp.apply_activation_checkpointing(model, mode)
    return model


class _StorageTracker(TorchDispatchMode):
    """Weak references to the storage of every tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                nbytes = storage.nbytes()
                if not nbytes:
                    continue
                known = self.storages.get(storage.data_ptr())
                if known is None or known[0].expired():  # a new storage (address reused)
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), nbytes)
        return out

    def alive_bytes(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def retained_forward_bytes(
    model: torch.nn.Module, pixels: torch.Tensor, ids: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """Bytes of the storages created by forward + loss that are alive after them (the
    memory kept for backward), and the loss."""
    gc.collect()
    tracker = _StorageTracker()
    with tracker:
        logits, labels = model(pixels, ids, labels=ids)
        loss = causal_lm_loss(logits, labels)
    del logits, labels
    gc.collect()
    return tracker.alive_bytes(), loss


def _batch(job: JobConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return w.make_batch(BATCH, job, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_activation_memory_ordering_and_gradients(arch: str) -> None:
    """none > selective > full in kept activation bytes (each step at least a third less),
    and the loss and every gradient equal to those without checkpointing."""
    _require_arch(arch)
    job = memory_job(arch)
    pixels, ids = _batch(job)
    kept: dict[str, int] = {}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    losses: dict[str, float] = {}
    for mode in MODES:
        model = build(job, mode)
        kept[mode], loss = retained_forward_bytes(model, pixels, ids)
        loss.backward()
        losses[mode] = loss.item()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    print(f"{arch}: kept bytes {kept}")
    assert kept["selective"] < 0.67 * kept["none"], kept
    assert kept["full"] < 0.67 * kept["selective"], kept
    for mode in ("selective", "full"):
        assert losses[mode] == pytest.approx(losses["none"], abs=1e-6)
        assert grads[mode].keys() == grads["none"].keys()
        assert any(g.abs().sum() > 0 for g in grads["none"].values())
        for name, want in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], want, atol=1e-6, rtol=1e-5, msg=name)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def matmuls(self) -> int:
        return sum(self.counts[op] for op in ("mm", "addmm", "bmm", "baddbmm"))

    def attention_kernels(self) -> int:
        """Forward SDPA kernels run (whatever the backend), not their backward."""
        return sum(
            n
            for op, n in self.counts.items()
            if op.startswith("_scaled_dot_product") and not op.endswith("_backward")
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_what_backward_recomputes(arch: str) -> None:
    """Selective: backward re-runs every attention kernel of the forward and no matmul
    (its matmul count equals the no-checkpointing backward's); full re-runs matmuls too."""
    _require_arch(arch)
    data = w.tiny_job_dict(arch)
    data["model"] = {**data["model"], "n_layers": LAYERS}
    job = JobConfig.model_validate(data)
    pixels, ids = w.make_batch(2, job, torch.Generator().manual_seed(0))
    forward: dict[str, _OpCounter] = {}
    backward: dict[str, _OpCounter] = {}
    for mode in MODES:
        model = build(job, mode)
        forward[mode], backward[mode] = _OpCounter(), _OpCounter()
        with forward[mode]:
            logits, labels = model(pixels, ids, labels=ids)
            loss = causal_lm_loss(logits, labels)
        with backward[mode]:
            loss.backward()
    attention_calls = forward["none"].attention_kernels()
    assert attention_calls >= LAYERS
    assert backward["none"].attention_kernels() == 0
    assert backward["selective"].attention_kernels() == attention_calls
    assert backward["selective"].matmuls() == backward["none"].matmuls()
    assert backward["full"].attention_kernels() == attention_calls
    assert backward["full"].matmuls() > backward["none"].matmuls()


def test_attention_scores_are_recomputed_on_the_math_path() -> None:
    """SDPA's math fallback (and any hand-written attention) computes ``q @ k^T`` with a
    matmul: selective checkpointing must not keep those ``(B, H, S, S)`` scores."""
    job = memory_job("joint_decoder")
    pixels, ids = _batch(job)
    fused = retained_forward_bytes(build(job, "selective"), pixels, ids)[0]
    with sdpa_kernel(SDPBackend.MATH):
        math = retained_forward_bytes(build(job, "selective"), pixels, ids)[0]
        math_none = retained_forward_bytes(build(job, "none"), pixels, ids)[0]
    seq = IMAGE_TOKENS + TEXT_LEN
    one_layer_scores = BATCH * job.model.n_heads * seq * seq * 4  # float32
    # the math path may keep the (B, S, D) product with V, never a score matrix
    assert math - fused < one_layer_scores, (math, fused, one_layer_scores)
    assert math < 0.67 * math_none


def test_saved_tensor_hooks_cannot_see_inside_checkpoints() -> None:
    """Why :func:`retained_forward_bytes` exists: an outer saved-tensor hook counts the
    same bytes for selective and full checkpointing although they keep very different
    amounts (everything inside a checkpointed block is invisible to it)."""
    job = memory_job("joint_decoder")
    pixels, ids = _batch(job)

    def hooked_bytes(model: torch.nn.Module) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, labels = model(pixels, ids, labels=ids)
            causal_lm_loss(logits, labels)
        return sum(seen.values())

    selective, full = build(job, "selective"), build(job, "full")
    assert hooked_bytes(selective) == hooked_bytes(full)
    kept_selective = retained_forward_bytes(selective, pixels, ids)[0]
    kept_full = retained_forward_bytes(full, pixels, ids)[0]
    assert kept_full < 0.67 * kept_selective


@pytest.mark.distributed
def test_selective_under_two_process_fsdp2(tmp_path: Any) -> None:
    """Selective checkpointing under FSDP2 (sharded after checkpointing, 2 processes) trains
    like one process without checkpointing (MoT: per-modality projections called
    directly, the case name-based selection missed)."""
    job = w.tiny_job_dict("mot")
    two = w.launch(
        "parity",
        2,
        tmp_path,
        job={**job, "parallel": {"activation_checkpointing": "selective"}},
    )
    one = w.w_parity(job=job)
    assert two[0]["losses"] == two[1]["losses"]
    for a, b in zip(two[0]["losses"], one["losses"]):
        assert a == pytest.approx(b, abs=1e-5)
