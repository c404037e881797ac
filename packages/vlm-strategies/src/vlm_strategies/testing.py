"""Conformance kit: the properties every arch must have, as checks an arch author runs.

Each ``check_*`` function builds a tiny VLM (random encoder, CPU, float32, a few
thousand parameters) around the arch, perturbs every parameter outside the encoder (so
zero-initialised side paths such as identity-at-init cross-attention blocks or closed
gates carry signal) and raises ``AssertionError`` naming the arch and the property when
the arch violates it:

==================  ====================================================================
``causality``       changing a later text token never changes earlier logits (skipped for
                    ``incremental_decoding = False``: non-causal archs)
``padded_frames``   a padded frame's pixels, and even garbage in its visual tokens, never
                    change logits; real frames do; an all-padded clip stays finite
``generation``      ``VLMWrapper.generate`` (KV cache when the arch has it, and
                    ``use_cache=False``) == greedy decoding by full recomputation, for
                    images and clips with a padded frame; with the cache, every step's
                    logits are close to the recomputed ones
``meta_init``       built on the meta device, ``to_empty`` then ``init_weights()``: the
                    structure of a CPU build and finite parameters, buffers and logits
``fsdp``            FSDP2 ``fully_shard`` of every trunk block and the root on a
                    single-process gloo group: same logits and gradients as unsharded
``compile``         ``torch.compile`` (``fullgraph=True``, backend ``eager``: dynamo
                    tracing, no graph break) forward and backward: same logits and
                    gradients as eager, at least one graph; call :func:`check_compile`
                    with ``backend="aot_eager"`` (traces the backward too, ~4x slower) or
                    ``"inductor"`` for more
``interleaved``     images anywhere: a left-padded batch of prompts with 2, 1 and 0
                    images in the middle: ``generate(batch)`` (KV cache when the arch has
                    it, and ``use_cache=False``) == greedy full recomputation, and every
                    cached step's logits are close to the recomputed ones
``packing``         samples packed into one row (``sequence_ids``) give the logits of
                    each sample run alone (atol 1e-5), images or not
``text_only``       a batch with no image (``pixel_values`` of shape ``(0,3,H,W)``):
                    logits, loss and decoder gradients bit-identical to the text-only
                    decoder; every parameter still gets a (zero) gradient (FSDP2 ranks
                    with text-only micro-batches stay in step)
==================  ====================================================================

The last three apply to archs that implement ``media_context`` (images anywhere); for a
prefix-only arch they check that a :class:`~vlm_strategies.MediaBatch` is rejected with
a ``ValueError`` naming the arch, then skip.

The FSDP2 check lives here (and not in ``vlm-parallel``, which depends on this package)
as a plain ``torch.distributed.fsdp.fully_shard`` per ``Transformer.blocks()`` unit on a
world-size-1 gloo group the check creates (and destroys) itself; ``vlm-parallel``'s own
tests cover the multi-process path.

Use with pytest (a check that does not apply to an arch calls ``pytest.skip`` with the
reason; outside pytest it raises :class:`NotApplicable`)::

    import pytest
    from vlm_strategies.testing import conformance_cases, run_case

    @pytest.mark.parametrize("case", conformance_cases())
    def test_my_arch_conforms(case: str) -> None:
        run_case(case, {"arch": "my_arch", "my_field": 2})

An arch is given as its ``[arch]`` section (a mapping with the discriminator ``arch``,
or an ``ArchConfig`` instance) or as a :class:`TinyVLM` when the encoder, adapter or
decoder of the tiny model must change.  The whole kit takes a few seconds per arch on
one CPU thread.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_config import ArchConfig, JobConfig
from vlm_strategies.build import build_vlm
from vlm_strategies.media import MediaBatch
from vlm_strategies.wrapper import VLMWrapper, causal_lm_loss
from vlm_transformer import KVCache

__all__ = [
    "NotApplicable",
    "TinyVLM",
    "check_causality",
    "check_compile",
    "check_fsdp",
    "check_generation",
    "check_interleaved",
    "check_meta_init",
    "check_packing",
    "check_text_only",
    "check_padded_frames",
    "conformance_cases",
    "run_case",
    "run_conformance",
]

TINY_MODEL: dict[str, Any] = {
    "dim": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 64,
    "max_seq_len": 160,
}
TINY_ENCODER: dict[str, Any] = {
    "type": "random",
    "num_tokens": 16,
    "feature_dim": 32,
    "image_size": 16,
}
TINY_ADAPTER: dict[str, Any] = {"type": "mlp_2layer"}
WAKE_STD = 0.1


class NotApplicable(Exception):
    """A check does not apply to this arch (raised outside pytest; under pytest the
    check is skipped with the same reason)."""


@dataclass(frozen=True)
class TinyVLM:
    """The tiny model a check builds around an arch.

    Attributes:
        arch: the ``[arch]`` section: a mapping with the discriminator ``arch`` (the
            arch must be registered: installed, or ``get_registry().register``-ed in
            process) or an ``ArchConfig``.  The kit sets ``frames_per_clip`` itself and
            ``max_text_len`` unless given.
        model: overrides of the tiny decoder (``dim=32``, 2 layers, 4 heads, 2 KV heads,
            vocabulary 64).
        encoder: replaces the tiny ``random`` encoder (16 tokens of width 32, 16 px).
        adapter: replaces the ``mlp_2layer`` adapter.
        name: shown in failure messages; default the arch name.
    """

    arch: Mapping[str, Any] | ArchConfig
    model: Mapping[str, Any] = field(default_factory=dict)
    encoder: Mapping[str, Any] | None = None
    adapter: Mapping[str, Any] | None = None
    name: str | None = None

    def arch_section(self) -> dict[str, Any]:
        if isinstance(self.arch, ArchConfig):
            return self.arch.model_dump()
        if "arch" not in self.arch:
            raise ValueError(
                f"TinyVLM.arch must name the arch in its 'arch' field, got keys {sorted(self.arch)}"
            )
        return dict(self.arch)

    @property
    def label(self) -> str:
        return self.name or str(self.arch_section()["arch"])

    def job(self, frames_per_clip: int = 1) -> JobConfig:
        """The validated job config with ``frames_per_clip`` frames per clip."""
        arch = {"max_text_len": 16, **self.arch_section(), "frames_per_clip": frames_per_clip}
        return JobConfig.model_validate(
            {
                "model": {**TINY_MODEL, **self.model},
                "encoder": dict(self.encoder or TINY_ENCODER),
                "adapter": dict(self.adapter or TINY_ADAPTER),
                "arch": arch,
            }
        )

    def build(self, frames_per_clip: int = 1, seed: int = 0, wake: bool = True) -> VLMWrapper:
        """Build (seeded), then (``wake``) add ``N(0, 0.1^2)`` noise to every parameter
        outside the vision encoder."""
        torch.manual_seed(seed)
        model = build_vlm(self.job(frames_per_clip))
        if wake:
            _wake(model, seed)
        return model


ArchSpec = TinyVLM | Mapping[str, Any] | ArchConfig


def _spec(arch: ArchSpec) -> TinyVLM:
    return arch if isinstance(arch, TinyVLM) else TinyVLM(arch)


@torch.no_grad()
def _wake(model: VLMWrapper, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if not name.startswith("vision_encoder.") and p.is_floating_point():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * WAKE_STD)


_PYTEST_SKIPS: ContextVar[bool] = ContextVar("vlm_conformance_pytest_skips", default=True)


def _skip(reason: str) -> None:
    pytest = sys.modules.get("pytest")
    if pytest is not None and _PYTEST_SKIPS.get():
        pytest.skip(reason)
    raise NotApplicable(reason)


def _inputs(
    model: VLMWrapper, batch: int, seq: int, seed: int, frames: int | None = None
) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = int(getattr(model.vision_encoder, "image_size", 16))
    shape = (batch, 3, size, size) if frames is None else (batch, frames, 3, size, size)
    vocab = model.transformer.config.vocab_size
    return torch.randn(shape, generator=gen), torch.randint(0, vocab, (batch, seq), generator=gen)


def _close(got: Tensor, want: Tensor, what: str, atol: float, rtol: float) -> None:
    try:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


def _differs(a: Tensor, b: Tensor, what: str) -> None:
    if torch.allclose(a, b, atol=1e-5, rtol=0):
        raise AssertionError(f"{what}: no effect (the check would be vacuous)")


# --------------------------------------------------------------------------- checks


def check_causality(arch: ArchSpec) -> None:
    """Changing text token ``p`` leaves the logits of positions ``< p`` unchanged (and
    does change position ``p``), for ``p`` in the middle and at the end.

    Not applicable to archs with ``incremental_decoding = False`` (non-causal routing).

    Raises:
        AssertionError: an earlier position saw a later token.
    """
    spec = _spec(arch)
    model = spec.build().eval()
    if not model.strategy.incremental_decoding:
        _skip(
            f"{spec.label}: {type(model.strategy).__qualname__} sets incremental_decoding = "
            "False (non-causal); its generation is checked by check_generation"
        )
    pixels, ids = _inputs(model, 2, 10, seed=1)
    vocab = model.transformer.config.vocab_size
    with torch.no_grad():
        base, _ = model(pixels, ids)
        for pos in (4, ids.shape[1] - 1):
            changed = ids.clone()
            changed[:, pos] = (changed[:, pos] + 1) % vocab
            out, _ = model(pixels, changed)
            _close(
                out[:, :pos],
                base[:, :pos],
                f"{spec.label} causality: changing text token {pos} changed earlier logits",
                atol=1e-6,
                rtol=1e-6,
            )
            _differs(out[:, pos], base[:, pos], f"{spec.label} causality: token {pos}")


def check_padded_frames(arch: ArchSpec, frames: int = 3) -> None:
    """Clips of ``frames`` frames with ``frame_mask`` rows ``[T, T, F]``, ``[T, F, F]``,
    ``[F, F, F]``: new pixels in padded frames, and random garbage in padded frames'
    visual tokens (so an arch cannot lean on ``encode_images`` zeroing them), never
    change logits; new pixels in a real frame change that row only; the all-padded row
    is finite.

    Raises:
        AssertionError: a padded frame leaked, a real frame had no effect, or a row was
            not finite.
    """
    spec = _spec(arch)
    model = spec.build(frames_per_clip=frames).eval()
    pixels, ids = _inputs(model, 3, 8, seed=2, frames=frames)
    mask = torch.ones(3, frames, dtype=torch.bool)
    mask[0, 2:] = False
    mask[1, 1:] = False
    mask[2] = False
    with torch.no_grad():
        base, _ = model(pixels, ids, frame_mask=mask)
        if not torch.isfinite(base).all():
            raise AssertionError(f"{spec.label} padded frames: non-finite logits")
        changed = pixels.clone()
        changed[~mask] = torch.randn_like(changed[~mask]) * 3
        out, _ = model(changed, ids, frame_mask=mask)
        _close(out, base, f"{spec.label}: a padded frame's pixels changed logits", 1e-6, 1e-6)
        with _garbage_in_padded_tokens(model):
            out, _ = model(pixels, ids, frame_mask=mask)
        _close(
            out,
            base,
            f"{spec.label}: visual tokens of padded frames (image_valid False) changed logits",
            1e-5,
            1e-5,
        )
        real = pixels.clone()
        real[0, 0] = torch.randn_like(real[0, 0]) * 3
        out, _ = model(real, ids, frame_mask=mask)
        _differs(out[0], base[0], f"{spec.label}: a real frame's pixels")
        _close(out[1:], base[1:], f"{spec.label}: one row's frame changed another row", 1e-6, 1e-6)


@contextmanager
def _garbage_in_padded_tokens(model: VLMWrapper) -> Iterator[None]:
    encode = model.encode_images

    def garbage(pixel_values: Tensor, frame_mask: Tensor | None = None) -> Any:
        embeds, valid = encode(pixel_values, frame_mask)
        if valid is None:
            return embeds, valid
        noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(3)) * 2
        return torch.where(valid[..., None], embeds, noise.to(embeds.dtype)), valid

    model.encode_images = garbage  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del model.encode_images


def check_generation(arch: ArchSpec, steps: int = 5) -> None:
    """Greedy ``generate`` equals greedy decoding by full recomputation (one forward
    per step), for single images and for 2-frame clips with a padded frame, with the
    arch's default route and with ``use_cache=False``.  With a KV cache, the logits of
    every cached step are close to the recomputed ones (``prepare`` then
    ``decode_context`` driven by hand).

    Raises:
        AssertionError: generated tokens or cached logits differ.
    """
    spec = _spec(arch)
    for frames, mask in ((1, None), (2, torch.tensor([[True, False], [True, True]]))):
        model = spec.build(frames_per_clip=frames, seed=frames).eval()
        pixels, ids = _inputs(model, 2, 4, seed=4, frames=None if frames == 1 else frames)
        what = f"{spec.label} generation ({'clip' if frames > 1 else 'image'})"
        want = _greedy_recompute(model, pixels, ids, mask, steps)
        for use_cache in (None, False):
            got = model.generate(
                pixels, ids, frame_mask=mask, max_new_tokens=steps, use_cache=use_cache
            )
            if not torch.equal(got, want):
                raise AssertionError(
                    f"{what}, use_cache={use_cache}: generate gave {got.tolist()}, greedy "
                    f"recomputation {want.tolist()}"
                )
        if model.strategy.incremental_decoding:
            _cached_logits_match(model, pixels, want, ids.shape[1], mask, what)


@torch.no_grad()
def _greedy_recompute(
    model: VLMWrapper, pixels: Tensor, ids: Tensor, mask: Tensor | None, steps: int
) -> Tensor:
    seq = ids
    for _ in range(steps):
        logits, _ = model(pixels, seq, frame_mask=mask)
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return seq


@torch.no_grad()
def _cached_logits_match(
    model: VLMWrapper, pixels: Tensor, seq: Tensor, prompt_len: int, mask: Tensor | None, what: str
) -> None:
    strategy = model.strategy
    embeds, valid = model.encode_images(pixels, mask)
    cache = KVCache()
    prompt = seq[:, :prompt_len]
    step_logits = model.transformer(prompt, strategy.prepare(model, pixels, prompt, mask), cache)
    for end in range(prompt_len, seq.shape[1]):
        ref, _ = model(pixels, seq[:, :end], frame_mask=mask)
        _close(step_logits[:, -1], ref[:, -1], f"{what}: cached logits at {end}", 1e-4, 1e-4)
        new = seq[:, end : end + 1]
        ctx = strategy.decode_context(embeds, valid, new, cache)
        step_logits = model.transformer(new, ctx, cache)


def check_meta_init(arch: ArchSpec) -> None:
    """``build_vlm(job, init_device="meta")`` puts every parameter outside the encoder on
    the meta device; after ``to_empty(device="cpu")`` (memory filled with NaN here) and
    ``init_weights()`` the model has the parameter and buffer names, shapes and dtypes
    of a CPU build, everything is finite, and a forward gives finite logits.

    Raises:
        AssertionError: a parameter was not on meta, differs in structure, or was left
            uninitialised.
    """
    spec = _spec(arch)
    job = spec.job(frames_per_clip=2)
    reference = build_vlm(job)
    model = build_vlm(job, init_device="meta")
    real = [n for n, p in model.named_parameters() if not p.is_meta]
    real = [n for n in real if not n.startswith("vision_encoder.")]
    if real:
        raise AssertionError(f"{spec.label} meta init: built off the meta device: {real}")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not name.startswith("vision_encoder.") and t.is_floating_point():
                t.fill_(float("nan"))
    model.init_weights()

    def structure(m: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype, bool]]:
        tensors = [*m.named_parameters(), *m.named_buffers()]
        return {n: (tuple(t.shape), t.dtype, isinstance(t, nn.Parameter)) for n, t in tensors}

    got, want = structure(model), structure(reference)
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise AssertionError(f"{spec.label} meta init: structure differs from a CPU build: {diff}")
    bad = [
        n
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_meta or (t.is_floating_point() and not torch.isfinite(t).all())
    ]
    if bad:
        raise AssertionError(f"{spec.label} meta init: init_weights left uninitialised: {bad}")
    pixels, ids = _inputs(model, 2, 6, seed=5, frames=2)
    with torch.no_grad():
        logits, _ = model(pixels, ids, frame_mask=torch.tensor([[True, False], [True, True]]))
    if not torch.isfinite(logits).all():
        raise AssertionError(f"{spec.label} meta init: non-finite logits")


@contextmanager
def _single_process_group() -> Iterator[None]:
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            _skip("check_fsdp runs on one process; this process group has several ranks")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _full_grad(p: Tensor) -> Tensor | None:
    grad = p.grad
    if grad is None:
        return None
    full = getattr(grad, "full_tensor", None)
    return full() if callable(full) else grad


def _loss(model: nn.Module, pixels: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    logits, _ = model(pixels, ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    aux = model.auxiliary_losses() if isinstance(model, VLMWrapper) else {}
    return logits, loss + sum(aux.values(), torch.zeros(()))


def _compare_training_step(
    what: str,
    model: nn.Module,
    reference: VLMWrapper,
    pixels: Tensor,
    ids: Tensor,
    params: Sequence[tuple[str, nn.Parameter]],
    run: Callable[[], tuple[Tensor, Tensor]],
) -> None:
    logits, loss = run()
    ref_logits, ref_loss = _loss(reference, pixels, ids)
    _close(logits, ref_logits, f"{what}: logits", 1e-5, 1e-5)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, p in params:
        got, want = _full_grad(p), ref_params[name].grad
        if (got is None) != (want is None):
            raise AssertionError(f"{what}: gradient of {name} is {got} vs eager {want}")
        if got is not None and want is not None:
            _close(got, want, f"{what}: gradient of {name}", 1e-5, 1e-4)


def check_fsdp(arch: ArchSpec) -> None:
    """FSDP2: ``fully_shard`` each of ``model.transformer.blocks()``, then the whole
    model, on a world-size-1 gloo group (created here unless one exists); one training
    step's logits and gradients equal the unsharded model's.

    Raises:
        AssertionError: sharding changed logits or gradients.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    spec = _spec(arch)
    reference = spec.build().train()
    model = copy.deepcopy(reference)
    pixels, ids = _inputs(model, 2, 8, seed=6)
    names = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with _single_process_group():
        mesh = init_device_mesh("cpu", (1,))
        for block in model.transformer.blocks():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if [n for n, _ in params] != [n for n, _ in names]:
            raise AssertionError(f"{spec.label} fsdp: sharding renamed parameters")
        plain = [n for n, p in params if not isinstance(p, DTensor)]
        if plain:
            raise AssertionError(f"{spec.label} fsdp: parameters left unsharded: {plain}")
        _compare_training_step(
            f"{spec.label} fsdp",
            model,
            reference,
            pixels,
            ids,
            params,
            lambda: _loss(model, pixels, ids),
        )


def check_compile(arch: ArchSpec, backend: str = "eager", fullgraph: bool = True) -> None:
    """``torch.compile(model, backend=backend, fullgraph=fullgraph)``: one training
    forward and backward give the eager logits and gradients, and at least one graph
    was compiled.  Resets dynamo's caches first (a fresh model per arch would otherwise
    run into the recompile limit and fall back to eager silently).

    Raises:
        AssertionError: compiled results differ, or nothing was compiled.
        torch._dynamo.exc.Unsupported: a graph break under ``fullgraph=True``.
    """
    from torch._dynamo.backends.registry import lookup_backend

    spec = _spec(arch)
    reference = spec.build().train()
    model = copy.deepcopy(reference)
    pixels, ids = _inputs(model, 2, 8, seed=7)
    inner = lookup_backend(backend)
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Any:
        graphs.append(len(gm.graph.nodes))
        return inner(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting, fullgraph=fullgraph)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def run() -> tuple[Tensor, Tensor]:
        logits, _ = compiled(pixels, ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return logits, loss + sum(model.auxiliary_losses().values(), torch.zeros(()))

    try:
        _compare_training_step(
            f"{spec.label} compile ({backend})", model, reference, pixels, ids, params, run
        )
    finally:
        torch._dynamo.reset()
    if not graphs:
        raise AssertionError(f"{spec.label} compile: torch.compile compiled no graph")


# ------------------------------------------------------------ images anywhere


@dataclass(frozen=True)
class _Sample:
    ids: Tensor  # (L,) long with placeholders
    pixels: Tensor  # (k, 3, H, W)


def _media_sample(
    model: VLMWrapper, parts: Sequence[int | str], gen: torch.Generator, placeholder: int
) -> _Sample:
    """``parts``: text lengths and ``"img"`` markers, e.g. ``(3, "img", 2)``."""
    size = int(getattr(model.vision_encoder, "image_size", 16))
    per_image = model.strategy.image_placeholders(model.num_image_tokens)
    pieces, images = [], []
    for part in parts:
        if part == "img":
            pieces.append(torch.full((per_image,), placeholder, dtype=torch.long))
            images.append(torch.randn(3, size, size, generator=gen))
        else:
            pieces.append(torch.randint(0, placeholder, (int(part),), generator=gen))
    pixels = torch.stack(images) if images else torch.zeros(0, 3, size, size)
    return _Sample(torch.cat(pieces), pixels)


def _media_batch(samples: Sequence[_Sample], placeholder: int, *, left_pad: bool) -> MediaBatch:
    """One sample per row, padded to the longest (left or right) with token 0."""
    width = max(int(x.ids.shape[0]) for x in samples)
    rows, masks, index = [], [], []
    for r, x in enumerate(samples):
        pad = width - int(x.ids.shape[0])
        fill = torch.zeros(pad, dtype=torch.long)
        real = torch.ones(x.ids.shape[0], dtype=torch.bool)
        rows.append(torch.cat((fill, x.ids) if left_pad else (x.ids, fill)))
        none = torch.zeros(pad, dtype=torch.bool)
        masks.append(torch.cat((none, real) if left_pad else (real, none)))
        index += [r] * int(x.pixels.shape[0])
    return MediaBatch(
        input_ids=torch.stack(rows),
        image_token_id=placeholder,
        pixel_values=torch.cat([x.pixels for x in samples]),
        image_sample_index=torch.tensor(index, dtype=torch.long),
        attention_mask=torch.stack(masks),
    )


def _media_model(spec: TinyVLM, seed: int) -> tuple[VLMWrapper, int]:
    """The tiny model (eval) and the placeholder id (the last vocabulary id); skips
    (after checking the rejection) for a prefix-only arch."""
    model = spec.build(seed=seed).eval()
    placeholder = model.transformer.config.vocab_size - 1
    if not model.strategy.supports_media:
        empty = torch.zeros(1, 3, dtype=torch.long)
        batch = MediaBatch(input_ids=empty, image_token_id=placeholder)
        try:
            model(batch)
        except ValueError as exc:
            if "supports only the image-prefix layout" not in str(exc):
                raise AssertionError(
                    f"{spec.label}: a MediaBatch for a prefix-only arch must raise a ValueError "
                    f"saying it supports only the image-prefix layout, got: {exc}"
                ) from None
        else:
            raise AssertionError(f"{spec.label}: no media_context() but a MediaBatch was accepted")
        _skip(f"{spec.label}: supports only the image-prefix layout (no media_context)")
    return model, placeholder


INTERLEAVED_PROMPTS: tuple[tuple[int | str, ...], ...] = (
    (2, "img", 3, "img", 2),
    (4, "img", 2),
    (5,),
)


def check_interleaved(arch: ArchSpec, steps: int = 5) -> dict[str, float]:
    """Generation from prompts with images in the middle (2, 1 and 0 images per row,
    left-padded): ``generate(batch)`` with the arch's default route and with
    ``use_cache=False`` == greedy decoding by full recomputation (one forward of the
    extended batch per step); with a KV cache, every cached step's logits are within
    1e-4 of the recomputed ones.

    Returns:
        ``{"cached_vs_recomputed_max_abs": ...}`` (0 for archs without a KV cache).

    Raises:
        AssertionError: tokens or cached logits differ.
    """
    spec = _spec(arch)
    model, placeholder = _media_model(spec, seed=5)
    gen = torch.Generator().manual_seed(6)
    samples = [_media_sample(model, p, gen, placeholder) for p in INTERLEAVED_PROMPTS]
    batch = _media_batch(samples, placeholder, left_pad=True)
    what = f"{spec.label} interleaved generation"
    with torch.no_grad():
        seq = batch.input_ids
        prompt_len = seq.shape[1]
        for _ in range(steps):
            logits, _ = model(batch.extended(seq[:, prompt_len:]))
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        for use_cache in (None, False):
            got = model.generate(batch, max_new_tokens=steps, use_cache=use_cache)
            if not torch.equal(got, seq):
                raise AssertionError(
                    f"{what}, use_cache={use_cache}: generate gave {got.tolist()}, greedy "
                    f"recomputation {seq.tolist()}"
                )
        worst = 0.0
        if model.strategy.incremental_decoding:
            strategy = model.strategy
            media = model.encode_media(batch)
            cache = KVCache()
            prefill = strategy.prepare_media(model, batch)
            step = model.transformer(seq[:, :prompt_len], prefill, cache)
            for end in range(prompt_len, seq.shape[1]):
                ref, _ = model(batch.extended(seq[:, prompt_len:end]))
                worst = max(worst, float((step[:, -1] - ref[:, -1]).abs().max()))
                _close(step[:, -1], ref[:, -1], f"{what}: cached logits at {end}", 1e-4, 1e-4)
                new = seq[:, end : end + 1]
                ctx = strategy.media_decode_context(media, new, cache)
                step = model.transformer(new, ctx, cache)
    return {"cached_vs_recomputed_max_abs": worst}


PACKED_SAMPLES: tuple[tuple[int | str, ...], ...] = (
    (2, "img", 3, "img", 2),
    (4,),
    (3, "img", 3),
    (1, "img", 2, "img", 1),
)


def check_packing(arch: ArchSpec) -> dict[str, float]:
    """Packing: samples (2, 0, 1 and 2 images) packed as row 0 = samples 0-2 and row 1
    = sample 3 + right padding (its own sample id), with ``sequence_ids``: every
    sample's logits equal those of the sample run alone within 1e-5 (no attention,
    position, media or routing state crosses a sample boundary).

    Returns:
        ``{"packed_vs_alone_max_abs": ...}``.

    Raises:
        AssertionError: a packed sample's logits differ from the sample alone.
    """
    spec = _spec(arch)
    model, placeholder = _media_model(spec, seed=7)
    gen = torch.Generator().manual_seed(8)
    samples = [_media_sample(model, p, gen, placeholder) for p in PACKED_SAMPLES]
    lengths = [int(x.ids.shape[0]) for x in samples]
    row0 = torch.cat([x.ids for x in samples[:3]])
    width = int(row0.shape[0])
    pad = width - lengths[3]
    if pad < 1:
        raise AssertionError("PACKED_SAMPLES: row 1 must be shorter than row 0")
    ids = torch.stack((row0, torch.cat((samples[3].ids, torch.zeros(pad, dtype=torch.long)))))
    seq0 = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths[:3])])
    seq1 = torch.cat((torch.full((lengths[3],), 3), torch.full((pad,), 4)))
    attention = torch.ones(2, width, dtype=torch.bool)
    attention[1, lengths[3] :] = False
    index = [0] * sum(int(x.pixels.shape[0]) for x in samples[:3]) + [1] * int(
        samples[3].pixels.shape[0]
    )
    packed = MediaBatch(
        input_ids=ids,
        image_token_id=placeholder,
        pixel_values=torch.cat([x.pixels for x in samples]),
        image_sample_index=torch.tensor(index, dtype=torch.long),
        attention_mask=attention,
        sequence_ids=torch.stack((seq0, seq1)),
    )
    worst = 0.0
    with torch.no_grad():
        logits, _ = model(packed)
        spans = [(0, 0, lengths[0]), (0, lengths[0], lengths[0] + lengths[1])]
        spans += [(0, lengths[0] + lengths[1], width), (1, 0, lengths[3])]
        for i, (row, lo, hi) in enumerate(spans):
            alone, _ = model(_media_batch([samples[i]], placeholder, left_pad=False))
            got = logits[row, lo:hi]
            worst = max(worst, float((got - alone[0]).abs().max()))
            _close(got, alone[0], f"{spec.label} packed sample {i} vs alone", 1e-5, 0.0)
    return {"packed_vs_alone_max_abs": worst}


def check_text_only(arch: ArchSpec) -> None:
    """A :class:`MediaBatch` with no image (``pixel_values`` ``(0, 3, H, W)``): its
    logits, loss and the decoder's gradients are bit-identical to the text-only
    decoder (``model.transformer(input_ids)``), and every parameter that is trainable
    gets a gradient (zero outside the decoder's text path), so FSDP2 runs the same
    collectives on a rank whose micro-batch has no image.

    Raises:
        AssertionError: values or gradients differ, or a parameter gets no gradient.
    """
    spec = _spec(arch)
    model, placeholder = _media_model(spec, seed=9)
    model.train()
    gen = torch.Generator().manual_seed(10)
    size = int(getattr(model.vision_encoder, "image_size", 16))
    ids = torch.randint(0, placeholder, (2, 9), generator=gen)
    batch = MediaBatch(
        input_ids=ids,
        image_token_id=placeholder,
        pixel_values=torch.zeros(0, 3, size, size),
        image_sample_index=torch.zeros(0, dtype=torch.long),
    )
    params = dict(model.named_parameters())
    logits, _ = model(batch)
    loss = causal_lm_loss(logits, ids)
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    ref_logits = model.transformer(ids)
    ref_loss = causal_lm_loss(ref_logits, ids)
    names = [n for n in params if n.startswith("transformer.")]
    ref = dict(zip(params, torch.autograd.grad(ref_loss, list(params.values()), allow_unused=True)))
    if not torch.equal(logits, ref_logits) or not torch.equal(loss, ref_loss):
        diff = float((logits - ref_logits).abs().max())
        raise AssertionError(
            f"{spec.label} text-only batch: logits/loss differ from the text-only decoder "
            f"(max abs {diff:.3g})"
        )
    for (name, p), g in zip(params.items(), got):
        if not p.requires_grad:
            continue
        if g is None:
            raise AssertionError(
                f"{spec.label} text-only batch: {name} gets no gradient (an FSDP2 rank with a "
                "text-only micro-batch would skip its reduce-scatter)"
            )
        want = ref[name] if name in names else None
        if want is None:
            want = torch.zeros_like(g)
        if not torch.equal(g, want):
            raise AssertionError(
                f"{spec.label} text-only batch: gradient of {name} differs from the text-only "
                f"decoder's (max abs {float((g - want).abs().max()):.3g})"
            )


_CASES: dict[str, Callable[[ArchSpec], object]] = {
    "causality": check_causality,
    "padded_frames": check_padded_frames,
    "generation": check_generation,
    "meta_init": check_meta_init,
    "fsdp": check_fsdp,
    "compile": check_compile,
    "interleaved": check_interleaved,
    "packing": check_packing,
    "text_only": check_text_only,
}


def conformance_cases() -> list[str]:
    """The names of every check, for ``pytest.mark.parametrize`` with :func:`run_case`:
    ``causality``, ``padded_frames``, ``generation``, ``meta_init``, ``fsdp``,
    ``compile``, ``interleaved``, ``packing``, ``text_only``."""
    return list(_CASES)


def run_case(case: str, arch: ArchSpec) -> None:
    """Run the check named ``case`` on ``arch``.

    Raises:
        ValueError: ``case`` is not one of :func:`conformance_cases`.
        AssertionError: the arch fails the check.
    """
    try:
        check = _CASES[case]
    except KeyError:
        raise ValueError(f"unknown conformance case {case!r}; known: {', '.join(_CASES)}") from None
    check(arch)


def run_conformance(arch: ArchSpec, cases: Sequence[str] | None = None) -> dict[str, str]:
    """Run ``cases`` (default: all) outside pytest, stopping at the first failure.

    Returns:
        ``{case: "passed" | "not applicable: <reason>"}``.

    Raises:
        ValueError: an unknown case name.
        AssertionError: the first check the arch fails.
    """
    results: dict[str, str] = {}
    token = _PYTEST_SKIPS.set(False)  # report inapplicable checks, do not skip
    try:
        for case in cases if cases is not None else conformance_cases():
            try:
                run_case(case, arch)
            except NotApplicable as exc:
                results[case] = f"not applicable: {exc}"
            else:
                results[case] = "passed"
    finally:
        _PYTEST_SKIPS.reset(token)
    return results
