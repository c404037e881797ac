"""Training-step benchmark of the four archs against the peers a user would pick instead.

One process, one run, the same inputs for everybody.  Shared size: text dim 256, 4
layers, 8 heads (MHA), vocab 4096, SwiGLU width from ``ModelConfig`` (704), an
``mlp_2layer`` adapter, 64 visual tokens, 128 text tokens, batch 8, float32, 2 threads.
Two vision encoders: the weight-free ``random`` stub (64 tokens of width 192) and a
tiny SigLIP tower built from config (hidden 192, 2 layers, 3 heads, MLP 768, patch 4 on
32 px = 64 tokens, trainable).

Rows (``ours`` = ``vlm_train.Trainer.step()``, the step ``vlm train`` runs, fed the
shared inputs as its micro-batch; peers from Hugging Face transformers):

* ``joint_decoder`` vs ``LlavaForConditionalGeneration`` (Llama text config of the same
  size, same SigLIP vision config with ``vision_use_head=False``,
  ``vision_feature_layer=-1``, ``vision_feature_select_strategy="full"``; its projector
  is the same Linear-GELU-Linear as ``mlp_2layer``).  Llava gets ``logits_to_keep=128``
  so that, like ours, it computes LM-head logits for the text positions only.  Random
  encoder rows: Llava has no "precomputed features" input, so the peer runs the same
  random encoder, Llava's own ``multi_modal_projector`` and embedding, concatenates
  ``[image, text]`` and calls Llava with ``inputs_embeds`` (exactly what Llava does
  internally after its vision tower).
* ``cross_attention`` (a cross block after decoder blocks 1 and 3) vs
  ``MllamaForCausalLM`` with ``cross_attention_layers=[2, 5]`` (same layer order
  D D X D D X), fed ``cross_attention_states`` = the same encoder + a Linear-GELU-Linear
  projector (Mllama's own tiled vision model with gated positional embeddings and
  multi-layer feature concatenation cannot be sized to match, so it is replaced).
  Matched: text dims, layer order, SwiGLU cross MLP, zero-gated cross output at init.
  Not matched: Mllama has per-head q/k RMSNorm in the cross attention and tanh gates;
  ours has a ``kv_norm`` RMSNorm on the image tokens and zero-init output projections;
  Mllama's embedding has 8 extra rows.  FLOPs are identical to within the norms.
* ``mot`` and ``moma`` (8 experts per modality, capacity 1/8) have no HF peer; they are
  reported against ``llama`` (below) and MoMa also against the same model with the
  per-expert Python loop of ``vlm_strategies.archs.moma.reference`` (``moma_loop``).
* ``llama``: ``LlamaForCausalLM`` on the decoder alone, 64+128 = 192 tokens, logits and
  loss over all 192 positions (no encoder, no adapter).

Weights: the decoder (and SigLIP tower and adapter) of each peer are copied from ours
(``vlm_transformer.hf.to_hf_state_dict``), so first-step losses agree (printed; they
differ only where the designs differ: Mllama's cross blocks are zero-gated at init on
both sides, so its first loss matches too).  Loss: ``causal_lm_loss`` (float32
cross-entropy over the text positions) for everybody, plus MoMa's auxiliary losses for
ours (the Trainer fuses the LM head with the cross-entropy).  Optimizer:
``torch.optim.AdamW(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)``: ours is the
Trainer's (fused; no decay on 1-D parameters; its schedule held constant), the peers'
implementation is ``--adamw`` (default ``fused``).  The Trainer's step also steps its
lr schedule and writes a metrics record every 10 steps; gradient clipping is off
(``train.grad_clip = None``) because the peers' steps do not clip.  ``--unfused-row``
adds ``joint_unfused_ce``, an ablation outside the Trainer (full logits, then
``causal_lm_loss``; the peer step's optimizer).  Timed steps
of all models of one encoder group alternate (rotating order), so machine drift hits
all alike.  ``tokens/s`` counts text + visual tokens (``B * 192``).

FLOPs per step (``model FLOPs``, forward + backward = 3 x forward; a matmul with ``p``
parameters applied to ``n`` tokens = ``2 p n`` forward FLOPs)::

    flops = 6 * sum(matmul_params_applied * tokens) + attention
    decoder   : 6 * L * (4 D^2 + 3 D F) * B * S          S = 192 (joint/mot/moma), 128 (cross)
    LM head   : 6 * D * V * B * S_head                    S_head = 128 (192 for llama)
    attention : 12 * L * D * B * Sq * Sk                  (QK^T and AV; causal not halved)
    cross     : 6 * C * ((2 D^2 + 3 D F) * B * T + 2 D^2 * B * P) + 12 * C * D * B * T * P
    siglip    : 6 * (3 p^2 Dv + Le (4 Dv^2 + 2 Dv Ie)) * B * P + 12 * Le * Dv * B * P^2
    random    : 2 * B * (g^2 * 3 p^2 * Dv + P * g^2 * Dv)          (fixed buffers: forward only)
    adapter   : 6 * (Dv * D + D * D) * B * P
    mot       : as the dense decoder (each position through one modality's copy)
    moma      : attention part as dense + 6 * sum_m (E k_m B) * 3 D Fe + routers 6 * B S D E M

``%exec`` uses the ``executed_flops`` of one real step counted by
``torch.utils.flop_counter`` (matmuls and convolutions, forward and backward; it does
not count the CPU flash-attention kernel, so it is a lower bound, and it shows work an
implementation skips, e.g. our last block's image positions).

Ceiling: median GFLOP/s of float32 ``torch.mm`` at the model's GEMM shapes and at
1024^3, measured in the same process at start and end; ``%ceil`` is achieved model
FLOP/s (the analytic count above) over the 1024^3 figure, ``%exec`` the same with the
executed (counted) FLOPs.

Compiled rows (``--compile``, random encoder, float32): ``<arch>+compile`` is ours with
``parallel.compile = true`` (:func:`vlm_parallel.apply_compile`: Inductor per trunk
block, what ``vlm train`` does), compared with the peer both eager (what a Hugging Face
user runs by default) and compiled (``<peer>+compile``: ``model.compile()`` of the whole
peer, the usual way to compile a transformers model).  ``moma_loop+compile`` is the
per-expert loop model compiled the same way as ours.  Compiled copies are deep copies of
the eager models (same weights); the first steps (compilation) are warm-up.

Timing: every model's steps run under the default glibc allocator (no memory
instrumentation), so the step times are what a training run sees.

Peak memory (after all timing, one fresh child process per model, so no other model's
freed memory or heap layout is in the way): the child builds the same model (compiled
the same way), runs two warm-up steps, switches glibc to serve every block of 64 KiB or
more with ``mmap`` and to trim the heap on ``free``
(:func:`peak_rss.mmap_large_allocations`) so that freed tensors leave the RSS at once,
then reports the RSS growth during one step over the RSS just before it (after
``gc.collect()`` and ``malloc_trim``; the peak is the kernel's exact high-water mark
``VmHWM``, reset before the step), maximum over ``--memory-steps`` steps.  Parameters,
gradients of the previous step (freed: ``zero_grad(set_to_none=True)``) and optimizer
state exist before the step and are not counted; the growth is activations + gradients
+ temporaries.  (Earlier versions timed under the same ``mmap`` setting: page-faulting
fresh pages on every allocation added 40-60% to every model's step time and to the
matmul ceiling alike.)

    OMP_NUM_THREADS=2 python benchmarks/bench_vlm.py --out build/bench
    nox -s bench

Outputs ``bench_vlm.json``, ``bench_vlm.png`` (and with ``--profile`` the top-10 op
tables of the joint-decoder step) under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peak_rss import PeakRSS, malloc_trim, mmap_large_allocations, rss_bytes
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

# shared size
DIM, LAYERS, HEADS, VOCAB = 256, 4, 8, 4096
IMG_TOKENS, IMG_DIM, IMAGE_SIZE, PATCH = 64, 192, 32, 4
TEXT, BATCH = 128, 8
SIGLIP_TOWER = {
    "hidden_size": IMG_DIM,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 4 * IMG_DIM,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH,
}
CROSS_EVERY = 2
MOMA_EXPERTS = 8


# --------------------------------------------------------------------------- memory


def load_average() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- ceiling
def mm_gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 7) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e9


def gemm_shapes(ffn: int) -> dict[str, tuple[int, int, int]]:
    rows = BATCH * (IMG_TOKENS + TEXT)
    return {
        "qkv": (rows, DIM, 3 * DIM),
        "o": (rows, DIM, DIM),
        "gate_up": (rows, DIM, 2 * ffn),
        "down": (rows, ffn, DIM),
        "lm_head": (BATCH * TEXT, DIM, VOCAB),
        "1024^3": (1024, 1024, 1024),
    }


def ceiling(ffn: int, dtype: torch.dtype) -> dict[str, float]:
    return {name: mm_gflops(*shape, dtype) for name, shape in gemm_shapes(ffn).items()}


# --------------------------------------------------------------------------- FLOPs
def dense_block_params(d: int, f: int) -> int:
    return 4 * d * d + 3 * d * f


def attention_flops(layers: int, d: int, b: int, sq: int, sk: int) -> int:
    return 12 * layers * d * b * sq * sk


def encoder_flops(encoder: str) -> int:
    b, p = BATCH, IMG_TOKENS
    if encoder == "siglip":
        t = SIGLIP_TOWER
        dv, le, ie, ps = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"], PATCH
        params = 3 * ps * ps * dv + le * (4 * dv * dv + 2 * dv * ie)
        return 6 * params * b * p + attention_flops(le, dv, b, p, p)
    g = 16 if IMAGE_SIZE % 16 == 0 else IMAGE_SIZE  # see vlm_encoders.random_encoder
    ps = IMAGE_SIZE // g
    return 2 * b * (g * g * 3 * ps * ps * IMG_DIM + p * g * g * IMG_DIM)


def model_flops(kind: str, encoder: str, ffn: int, moma_ks: list[int] | None = None) -> int:
    """Analytic model FLOPs of one training step (see the module docstring)."""
    b, p, t, d, v, layers = BATCH, IMG_TOKENS, TEXT, DIM, VOCAB, LAYERS
    s = p + t
    vision = encoder_flops(encoder) + 6 * (IMG_DIM * d + d * d) * b * p
    head = 6 * d * v * b * t
    if kind == "llama":
        return (
            6 * layers * dense_block_params(d, ffn) * b * s
            + attention_flops(layers, d, b, s, s)
            + 6 * d * v * b * s
        )
    if kind in ("joint_decoder", "mot"):
        dec = 6 * layers * dense_block_params(d, ffn) * b * s + attention_flops(layers, d, b, s, s)
        return vision + dec + head
    if kind == "cross_attention":
        c = LAYERS // CROSS_EVERY
        dec = 6 * layers * dense_block_params(d, ffn) * b * t + attention_flops(layers, d, b, t, t)
        cross = 6 * c * ((2 * d * d + 3 * d * ffn) * b * t + 2 * d * d * b * p)
        cross += attention_flops(c, d, b, t, p)
        return vision + dec + cross + head
    if kind == "moma":
        assert moma_ks is not None
        attn = 6 * layers * 4 * d * d * b * s + attention_flops(layers, d, b, s, s)
        experts = 6 * layers * sum(MOMA_EXPERTS * k * b for k in moma_ks) * 3 * d * ffn
        routers = 6 * layers * b * s * d * MOMA_EXPERTS * len(moma_ks)
        return vision + attn + experts + routers + head
    raise ValueError(kind)


# --------------------------------------------------------------------------- models
@dataclass
class Runner:
    name: str  # e.g. "joint_decoder", "llava"
    group: str  # "random" | "siglip"
    dtype: str  # "float32" | "bfloat16"
    side: str  # "ours" | "peer"
    model: nn.Module
    forward: Callable[[Any], Tensor]  # forward(model) returns the loss
    flops: int
    peers: tuple[str, ...] = ()  # the rows this one is compared with
    opt: torch.optim.Optimizer | None = None
    trainer: Any = None  # ours: the vlm_train.Trainer whose step() is timed
    batches: list[Any] = field(default_factory=list)  # ours: the fixed micro-batch
    arch: dict[str, Any] = field(default_factory=dict)  # ours: the arch section
    times: list[float] = field(default_factory=list)
    growth: int = 0
    first_loss: float = float("nan")
    executed: int = 0

    @property
    def key(self) -> str:
        return f"{self.name}/{self.group}/{self.dtype}"

    def step(self) -> Tensor:
        if self.trainer is not None:  # the step `vlm train` runs, on the shared inputs
            return torch.tensor(self.trainer.step(self.batches))
        assert self.opt is not None
        ctx = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self.dtype == "bfloat16"
            else contextlib.nullcontext()
        )
        with ctx:
            loss = self.forward(self.model)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def job_config(
    arch: dict[str, Any], encoder: str, train: dict[str, Any] | None = None, **sections: Any
) -> Any:
    from vlm_config import JobConfig

    enc: dict[str, Any]
    if encoder == "siglip":
        enc = {"type": "siglip", "tower": dict(SIGLIP_TOWER)}
    else:
        enc = {
            "type": "random",
            "num_tokens": IMG_TOKENS,
            "feature_dim": IMG_DIM,
            "image_size": IMAGE_SIZE,
        }
    return JobConfig.model_validate(
        {
            "model": {
                "dim": DIM,
                "n_layers": LAYERS,
                "n_heads": HEADS,
                "vocab_size": VOCAB,
                "max_seq_len": 256,
            },
            "encoder": enc,
            "adapter": {"type": "mlp_2layer"},
            "arch": {"max_text_len": TEXT, **arch},
            "train": train or {},
            **sections,
        }
    )


def make_trainer(
    arch: dict[str, Any], encoder: str, dtype: str, run_dir: Path, compile_blocks: bool = False
) -> Any:
    """A set-up :class:`vlm_train.Trainer` of the shared size, its optimizer matching
    the peers' (AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.1, constant lr: no
    warmup, a cosine over 10^6 steps) and no gradient clipping (the peers' steps do
    not clip).  Everything else is what ``vlm train`` does: fused AdamW, the fused
    LM-head loss, auxiliary losses, bf16 autocast for the bfloat16 rows, Inductor per
    trunk block with ``compile_blocks`` (``parallel.compile = true``)."""
    from vlm_train import Trainer

    train = {
        "steps": 10**6,
        "batch_size": BATCH,
        "lr": 1e-4,
        "betas": [0.9, 0.95],
        "weight_decay": 0.1,
        "warmup_steps": 0,
        "min_lr_ratio": 1.0,
        "grad_clip": None,
        "autocast_bf16": dtype == "bfloat16",
        "progress": False,
        "eval_at_end": False,
        "export": False,
        "resume": False,
        "output_dir": str(run_dir),
    }
    job = job_config(arch, encoder, train, parallel={"compile": compile_blocks})
    trainer = Trainer(job, log=lambda _msg: None)
    trainer.setup()
    return trainer


def fixed_batches(pixels: Tensor, ids: Tensor, labels: Tensor) -> list[Any]:
    """The shared inputs as the Trainer's one micro-batch (a ``vlm_train.Batch``)."""
    n = ids.shape[0]
    return [
        {
            "pixel_values": pixels,
            "frame_mask": None,
            "input_ids": ids,
            "labels": labels,
            "attention_mask": torch.ones_like(ids, dtype=torch.bool),
            "prompts": [""] * n,
            "captions": [""] * n,
            "meta": [{} for _ in range(n)],
        }
    ]


def unfused_loss(pixels: Tensor, ids: Tensor, labels: Tensor) -> Callable[[Any], Tensor]:
    """The ``joint_unfused_ce`` ablation (``--unfused-row``): full ``(B, S, V)`` logits,
    then ``causal_lm_loss``.  Not what ``vlm train`` runs (its step fuses the LM head
    with the cross-entropy), so it is measured outside the Trainer."""
    from vlm_strategies import causal_lm_loss

    def forward(model: Any) -> Tensor:
        logits, _ = model(pixels, ids, labels)
        loss = causal_lm_loss(logits, labels)
        aux = model.auxiliary_losses()
        if aux:
            loss = loss + sum(aux.values())
        return loss  # type: ignore[no-any-return]

    return forward


def llama_text_config(ffn: int, **extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": DIM,
        "intermediate_size": ffn,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        **extra,
    }


def copy_vision(ours: Any, prefix: str) -> dict[str, Tensor]:
    """Ours' SigLIP tower + adapter weights under the peer's names."""
    out = {}
    for k, v in ours.vision_encoder.state_dict().items():
        if k.startswith("tower."):
            out[prefix + k.removeprefix("tower.")] = v
    for ours_name, hf_name in (("fc1", "linear_1"), ("fc2", "linear_2")):
        for leaf in ("weight", "bias"):
            out[f"{hf_name}.{leaf}"] = ours.adapter.state_dict()[f"{ours_name}.{leaf}"]
    return out


class Projector(nn.Module):
    """Linear -> GELU -> Linear, named like Llava's ``multi_modal_projector``."""

    def __init__(self, din: int, d: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(din, d)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class MllamaPeer(nn.Module):
    """Vision tower (SigLIP or the random stub) + projector + ``MllamaForCausalLM``."""

    def __init__(self, vision: nn.Module | None, random_encoder: nn.Module, lm: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        self.random_encoder = random_encoder
        self.projector = Projector(IMG_DIM, DIM)
        self.lm = lm

    def forward(self, pixels: Tensor, ids: Tensor) -> Tensor:
        if self.vision is not None:
            feats = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        else:
            feats = self.random_encoder(pixels)
        states = self.projector(feats)
        return self.lm(input_ids=ids, cross_attention_states=states, use_cache=False).logits


def build_runners(
    group: str, dtype: str, archs: list[str], args: argparse.Namespace
) -> list[Runner]:
    import transformers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MllamaForCausalLM,
        MllamaTextConfig,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from vlm_strategies import build_vlm, causal_lm_loss
    from vlm_transformer.hf import to_hf_state_dict

    transformers.utils.logging.set_verbosity_error()
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    ids = torch.randint(1, VOCAB, (BATCH, TEXT), generator=g)  # id 0 is Llava's image token
    labels = ids.clone()
    runners: list[Runner] = []

    runs = Path(args.out) / "trainer_runs" / f"{group}_{dtype}_{os.getpid()}"
    batches = fixed_batches(pixels, ids, labels)

    def trainer_for(name: str, arch: dict[str, Any]) -> Any:
        return make_trainer(arch, group, dtype, runs / name)

    joint_trainer = trainer_for("joint_decoder", {"arch": "joint_decoder"})
    joint = joint_trainer.model
    ffn = joint.transformer.config.hidden_dim
    dec_cfg = joint.transformer.config
    hf_dec = to_hf_state_dict(joint.transformer.state_dict(), dec_cfg)

    def add(
        name: str,
        side: str,
        model: nn.Module,
        forward: Callable[[Any], Tensor] | None,
        kind: str,
        peers: tuple[str, ...] = (),
        moma_ks: list[int] | None = None,
        trainer: Any = None,
        arch: dict[str, Any] | None = None,
    ) -> None:
        """A runner of this group and dtype, with the model FLOPs of ``kind``; ours
        (``trainer`` given) times ``trainer.step`` on the shared inputs."""
        flops = model_flops(kind, group, ffn, moma_ks)
        runner = Runner(name, group, dtype, side, model, forward, flops, peers=peers)
        if trainer is not None:
            runner.trainer, runner.batches, runner.arch = trainer, batches, arch or {}
        runners.append(runner)

    if "joint_decoder" in archs:
        add(
            "joint_decoder",
            "ours",
            joint,
            None,
            "joint_decoder",
            peers=("llava",),
            trainer=joint_trainer,
            arch={"arch": "joint_decoder"},
        )
        vcfg = SiglipVisionConfig(**SIGLIP_TOWER, vision_use_head=False)
        lcfg = LlavaConfig(
            vision_config=vcfg,
            text_config=LlamaConfig(**llama_text_config(ffn)),
            image_token_id=0,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            projector_hidden_act="gelu",
        )
        llava = LlavaForConditionalGeneration(lcfg).train()
        state = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in hf_dec.items()}
        state["lm_head.weight"] = state.pop("model.language_model.lm_head.weight")
        vision = copy_vision(joint, "model.vision_tower.")
        for k, v in vision.items():
            state[k if k.startswith("model.") else f"model.multi_modal_projector.{k}"] = v
        missing, unexpected = llava.load_state_dict(state, strict=False)
        bad = [
            k
            for k in missing
            if "post_layernorm" not in k and (group == "siglip" or "vision" not in k)
        ]
        if bad or unexpected:
            raise RuntimeError(f"llava weight copy: missing {bad}, unexpected {unexpected}")
        if group == "siglip":
            llava_ids = torch.cat((torch.zeros(BATCH, IMG_TOKENS, dtype=torch.long), ids), dim=1)

            def llava_fwd(m: Any = llava) -> Tensor:
                out = m(
                    input_ids=llava_ids, pixel_values=pixels, logits_to_keep=TEXT, use_cache=False
                )
                return causal_lm_loss(out.logits, labels)

        else:
            random_enc = joint.vision_encoder

            def llava_fwd(m: Any = llava, enc: nn.Module = random_enc) -> Tensor:
                img = m.model.multi_modal_projector(enc(pixels))
                emb = torch.cat((img, m.get_input_embeddings()(ids)), dim=1)
                out = m(inputs_embeds=emb, logits_to_keep=TEXT, use_cache=False)
                return causal_lm_loss(out.logits, labels)

        if args.unfused_row:
            torch.manual_seed(0)
            plain = build_vlm(job_config({"arch": "joint_decoder"}, group)).train()
            plain.load_state_dict(joint.state_dict())
            add(
                "joint_unfused_ce",
                "ours",
                plain,
                unfused_loss(pixels, ids, labels),
                "joint_decoder",
                peers=("llava",),
            )
        add("llava", "peer", llava, llava_fwd, "joint_decoder")

    if "cross_attention" in archs:
        cross_arch = {"arch": "cross_attention", "cross_attention_every_n_layers": CROSS_EVERY}
        cross_trainer = trainer_for("cross_attention", cross_arch)
        cross = cross_trainer.model
        # same decoder weights as the joint model (so every peer shares one decoder)
        cross.transformer.load_state_dict(joint.transformer.state_dict(), strict=False)
        cross.vision_encoder.load_state_dict(joint.vision_encoder.state_dict())
        cross.adapter.load_state_dict(joint.adapter.state_dict())
        add(
            "cross_attention",
            "ours",
            cross,
            None,
            "cross_attention",
            peers=("mllama",),
            trainer=cross_trainer,
            arch=cross_arch,
        )
        n_total = LAYERS + LAYERS // CROSS_EVERY
        cross_idx = [i for i in range(n_total) if (i + 1) % (CROSS_EVERY + 1) == 0]
        mcfg = MllamaTextConfig(
            **llama_text_config(ffn, num_hidden_layers=n_total), cross_attention_layers=cross_idx
        )
        lm = MllamaForCausalLM(mcfg)
        self_idx = [i for i in range(n_total) if i not in cross_idx]
        state = {}
        for k, v in hf_dec.items():
            if k.startswith("model.layers."):
                rest = k.removeprefix("model.layers.")
                i, tail = rest.split(".", 1)
                state[f"model.layers.{self_idx[int(i)]}.{tail}"] = v
            elif k == "model.embed_tokens.weight":
                emb = lm.model.embed_tokens.weight.detach().clone()
                emb[:VOCAB] = v
                state[k] = emb
            else:
                state[k] = v
        missing, unexpected = lm.load_state_dict(state, strict=False)
        if unexpected or any(f"layers.{i}." in k for k in missing for i in self_idx):
            raise RuntimeError(f"mllama weight copy: missing {missing}, unexpected {unexpected}")
        vision_tower = None
        if group == "siglip":
            vision_tower = SiglipVisionModel(
                SiglipVisionConfig(**SIGLIP_TOWER, vision_use_head=False)
            )
        peer = MllamaPeer(vision_tower, joint.vision_encoder, lm).train()
        vis = copy_vision(joint, "vision.")
        peer_state = {k if k.startswith("vision.") else f"projector.{k}": v for k, v in vis.items()}
        if group != "siglip":
            peer_state = {k: v for k, v in peer_state.items() if not k.startswith("vision.")}
        missing, unexpected = peer.load_state_dict(peer_state, strict=False)
        if unexpected:
            raise RuntimeError(f"mllama vision copy: unexpected {unexpected}")

        def mllama_fwd(m: Any = peer) -> Tensor:
            return causal_lm_loss(m(pixels, ids), labels)

        add("mllama", "peer", peer, mllama_fwd, "cross_attention")

    if "mot" in archs:
        mot_trainer = trainer_for("mot", {"arch": "mot"})
        add(
            "mot",
            "ours",
            mot_trainer.model,
            None,
            "mot",
            peers=("llama",),
            trainer=mot_trainer,
            arch={"arch": "mot"},
        )

    if "moma" in archs:
        from vlm_strategies.archs.moma.experts import MoMaExperts

        for loop in (False, True):
            if loop and not args.moma_loop:
                continue
            moma_arch = {"arch": "moma", "experts_per_modality": MOMA_EXPERTS}
            moma_trainer = trainer_for("moma_loop" if loop else "moma", moma_arch)
            moma = moma_trainer.model
            layer0 = next(m for m in moma.modules() if isinstance(m, MoMaExperts))
            ks = layer0.capacities((IMG_TOKENS, TEXT), IMG_TOKENS + TEXT)
            if loop:
                patch_moma_loop(moma)
            add(
                "moma_loop" if loop else "moma",
                "ours",
                moma,
                None,
                "moma",
                peers=("moma_loop", "llama") if not loop and args.moma_loop else ("llama",),
                moma_ks=ks,
                trainer=moma_trainer,
                arch=moma_arch,
            )

    if "llama" in archs:
        llama = LlamaForCausalLM(LlamaConfig(**llama_text_config(ffn))).train()
        llama.load_state_dict(hf_dec)
        full_ids = torch.randint(1, VOCAB, (BATCH, IMG_TOKENS + TEXT), generator=g)

        def llama_fwd(m: Any = llama) -> Tensor:
            return causal_lm_loss(m(input_ids=full_ids, use_cache=False).logits, full_ids)

        add("llama", "peer", llama, llama_fwd, "llama")

    for r in runners:
        if r.trainer is None:
            r.opt = make_optimizer(r.model, args.adamw)
    return runners


def patch_moma_loop(model: nn.Module) -> None:
    """Swap every MoMa expert layer's batched forward for the per-expert Python loop of
    ``vlm_strategies.archs.moma.reference`` (same weights and routing; no aux losses)."""
    from vlm_strategies.archs.moma.experts import MoMaExperts
    from vlm_strategies.archs.moma.reference import loop_expert_forward

    for m in model.modules():
        if isinstance(m, MoMaExperts):

            def fwd(
                x: Tensor,
                modality_ids: Tensor,
                valid: Tensor | None,
                counts: Any,
                noise: Any = None,
                _m: MoMaExperts = m,
            ) -> Tensor:
                _m.aux = {}
                _m.stats = {}
                return loop_expert_forward(_m, x, modality_ids, valid, counts, noise)

            m.forward = fwd  # type: ignore[method-assign]


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    kw: dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.1, "betas": (0.9, 0.95)}
    kw["fused" if kind == "fused" else "foreach"] = kind != "for-loop"
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, **kw)


# --------------------------------------------------------------------------- running
def compiled_copies(
    runners: list[Runner], names: set[str], args: argparse.Namespace
) -> list[Runner]:
    """``<name>+compile`` deep copies of the runners named in ``names`` (see the module
    docstring); ours are Trainers with ``parallel.compile = true`` (:func:`vlm_parallel.
    apply_compile` per trunk block) loaded with the eager weights, peers ``model.compile()``."""
    from dataclasses import replace

    chosen = [r for r in runners if r.name in names]
    compiled = {r.name for r in chosen}
    runs = Path(args.out) / "trainer_runs" / f"compiled_{os.getpid()}"
    out = []
    for r in chosen:
        trainer = None
        if r.trainer is not None:  # ours: a Trainer with parallel.compile = true
            trainer = make_trainer(r.arch, r.group, r.dtype, runs / r.name, compile_blocks=True)
            trainer.model.load_state_dict(r.model.state_dict())
            model = trainer.model
        else:
            model = copy.deepcopy(r.model)
            model.compile()
        if r.name == "moma_loop":  # the patched forward closes over the original layers
            patch_moma_loop(model)
        peers = (*r.peers, *(f"{p}+compile" for p in r.peers if p in compiled))
        twin = replace(
            r,
            name=f"{r.name}+compile",
            model=model,
            peers=peers,
            opt=None,
            trainer=trainer,
            times=[],
            growth=0,
        )
        if trainer is None:
            twin.opt = make_optimizer(model, args.adamw)
        out.append(twin)
    return out


def run_group(runners: list[Runner], warmup: int, steps: int, count_flops: bool) -> None:
    """Warm-up (the first step's loss is recorded and, with ``count_flops``, its FLOPs
    counted), then ``steps`` timed steps of every runner in rotating order."""
    eager_counts: dict[str, int] = {}
    for r in runners:
        if count_flops and r.name.endswith("+compile"):
            # compiled code is not seen by the counter: the eager twin executes the same
            r.executed = eager_counts.get(r.name.removesuffix("+compile"), 0)
            r.first_loss = float(r.step())
        elif count_flops:
            with FlopCounterMode(display=False) as counter:
                r.first_loss = float(r.step())
            r.executed = eager_counts[r.name] = int(counter.get_total_flops())
        else:
            r.first_loss = float(r.step())
    for _ in range(warmup - 1):
        for r in runners:
            r.step()
    n = len(runners)
    for i in range(steps):
        for j in range(n):
            r = runners[(i + j) % n]
            t0 = time.perf_counter()
            r.step()
            r.times.append(time.perf_counter() - t0)


def measure_memory(runners: list[Runner], steps: int) -> None:
    """Peak RSS growth of one step, max over ``steps`` (call after
    :func:`peak_rss.mmap_large_allocations`)."""
    for r in runners:
        r.step()  # the first step under the new allocator settings is not measured
        for _ in range(steps):
            gc.collect()
            malloc_trim()
            base = rss_bytes()
            with PeakRSS() as peak:
                r.step()
            r.growth = max(r.growth, peak.peak - base)


_ARCH_OF = {
    "llava": "joint_decoder",
    "joint_unfused_ce": "joint_decoder",
    "mllama": "cross_attention",
    "moma_loop": "moma",
}


def memory_child(key: str, args: argparse.Namespace) -> None:
    """``--memory-child name/group/dtype``: build that model alone, warm it up, print its
    peak RSS growth per step (bytes) as the last line."""
    name, group, dtype = key.split("/")
    base = name.removesuffix("+compile")
    runners = build_runners(group, dtype, [_ARCH_OF.get(base, base)], args)
    if name.endswith("+compile"):
        runners = compiled_copies(runners, {base}, args)
    (runner,) = (r for r in runners if r.name == name)
    for _ in range(2):
        runner.step()
    if not mmap_large_allocations():
        print("warning: not glibc; peak RSS growth under-counts freed-and-reused memory")
    measure_memory([runner], args.memory_steps)
    print(json.dumps({"key": key, "growth": runner.growth}))


def memory_in_children(runners: list[Runner], args: argparse.Namespace) -> None:
    """Fill ``growth`` of every runner from :func:`memory_child` subprocesses."""
    passthrough = ["--threads", str(args.threads), "--adamw", args.adamw]
    passthrough += ["--memory-steps", str(args.memory_steps)]
    for i, r in enumerate(runners, 1):
        cmd = [sys.executable, __file__, "--memory-child", r.key, *passthrough]
        if r.name.startswith("joint_unfused_ce"):
            cmd.append("--unfused-row")
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child {r.key} failed:\n{done.stderr[-3000:]}")
        r.growth = int(json.loads(done.stdout.strip().splitlines()[-1])["growth"])
        print(f"  memory {i}/{len(runners)} {r.key}: {r.growth / 2**20:.1f} MB", flush=True)


def profile_step(r: Runner, out: Path, tag: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    r.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        r.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    path = out / f"profile_{r.name}_{r.group}_{r.dtype}_{tag}.txt"
    path.write_text(table)
    return table


def summarize(runners: list[Runner], ceil: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    by_key = {r.key: r for r in runners}
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        top = ceil[r.dtype]["1024^3"] * 1e9
        comparisons = []
        for name in r.peers:
            peer = by_key.get(f"{name}/{r.group}/{r.dtype}")
            if peer is None:
                continue
            peer_med = statistics.median(peer.times)
            comparisons.append(
                {
                    "peer": peer.name,
                    "peer_median_ms": peer_med * 1e3,
                    "speedup_vs_peer": peer_med / med,
                    "peer_peak_rss_growth_mb": peer.growth / 2**20,
                    "peer_first_loss": peer.first_loss,
                }
            )
        rows.append(
            {
                "model": r.name,
                "side": r.side,
                "encoder": r.group,
                "dtype": r.dtype,
                "median_ms": med * 1e3,
                "min_ms": min(r.times) * 1e3,
                "steps": len(r.times),
                "tokens_per_s": BATCH * (IMG_TOKENS + TEXT) / med,
                "flops_per_step": r.flops,
                "executed_flops_per_step": r.executed,
                "gflops_per_s": r.flops / med / 1e9,
                "pct_of_ceiling": 100 * r.flops / med / top,
                "executed_pct_of_ceiling": 100 * r.executed / med / top if r.executed else None,
                "peak_rss_growth_mb": r.growth / 2**20,
                "params_m": sum(p.numel() for p in r.model.parameters()) / 1e6,
                "first_loss": r.first_loss,
                "comparisons": comparisons,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'arch':<24} {'enc':<7} {'dtype':<9} {'ours ms':>8} {'peer':<16} {'peer ms':>8} "
        f"{'ratio':>6} {'GFLOP/s':>8} {'%ceil':>6} {'%exec':>6} {'peak MB':>8} {'peer MB':>8} "
        f"{'loss':>8} {'peer loss':>9}"
    )
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for row in rows:
        if row["side"] != "ours":
            continue
        for c in row["comparisons"] or [{}]:
            lines.append(
                f"{row['model']:<24} {row['encoder']:<7} {row['dtype']:<9} "
                f"{row['median_ms']:8.1f} {c.get('peer', '-'):<16} "
                f"{c.get('peer_median_ms', nan):8.1f} {c.get('speedup_vs_peer', nan):6.2f} "
                f"{row['gflops_per_s']:8.1f} {row['pct_of_ceiling']:6.1f} "
                f"{row['executed_pct_of_ceiling'] or nan:6.1f} "
                f"{row['peak_rss_growth_mb']:8.1f} {c.get('peer_peak_rss_growth_mb', nan):8.1f} "
                f"{row['first_loss']:8.4f} {c.get('peer_first_loss', nan):9.4f}"
            )
    lines.append("")
    lines.append(
        f"{'peer row':<24} {'enc':<7} {'dtype':<9} {'ms':>8} {'GFLOP/s':>8} "
        f"{'%ceil':>6} {'%exec':>6} {'peak MB':>8}"
    )
    for row in rows:
        if row["side"] == "peer":
            lines.append(
                f"{row['model']:<24} {row['encoder']:<7} {row['dtype']:<9} {row['median_ms']:8.1f} "
                f"{row['gflops_per_s']:8.1f} {row['pct_of_ceiling']:6.1f} "
                f"{row['executed_pct_of_ceiling'] or nan:6.1f} {row['peak_rss_growth_mb']:8.1f}"
            )
    text = "\n".join(lines)
    print(text)
    return text


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: ours vs each peer, median step time side by side; right: the speed ratio
    (peer / ours) with 1.0 and the 1.25 target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [
        (row, c)
        for row in rows
        if row["side"] == "ours" and not row["model"].startswith("moma_loop")
        for c in row["comparisons"]
    ]
    labels = [
        f"{r['model']} vs {c['peer']} ({r['encoder']}, "
        f"{'bf16' if r['dtype'] == 'bfloat16' else 'fp32'})"
        for r, c in pairs
    ]
    y = range(len(pairs))
    fig, (ax_t, ax_r) = plt.subplots(
        1, 2, figsize=(13, 0.32 * len(pairs) + 1.6), sharey=True, width_ratios=[3, 2]
    )
    ax_t.barh([i - 0.2 for i in y], [r["median_ms"] for r, _ in pairs], 0.4, label="ours")
    ax_t.barh([i + 0.2 for i in y], [c["peer_median_ms"] for _, c in pairs], 0.4, label="peer")
    ax_t.set_yticks(list(y), labels, fontsize=7)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("median training step (ms)")
    ax_t.legend(loc="lower right", fontsize=8)
    ratios = [c["speedup_vs_peer"] for _, c in pairs]
    ax_r.barh(list(y), ratios, 0.6, color=["tab:green" if v >= 1 else "tab:red" for v in ratios])
    for value in (1.0, 1.25):
        ax_r.axvline(value, color="black", linestyle="-" if value == 1 else "--", linewidth=0.8)
    ax_r.set_xlabel("speed ratio peer / ours (> 1: ours faster; dashed: 1.25)")
    ax_r.set_xlim(0.5, max(1.5, max(ratios) + 0.1))
    fig.suptitle("training step, batch 8, 64 image + 128 text tokens, 2 CPU threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="build/bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--encoders", default="random,siglip")
    p.add_argument("--archs", default="joint_decoder,cross_attention,mot,moma,llama")
    p.add_argument(
        "--bf16",
        default="joint_decoder,cross_attention,llama",
        help="archs also measured under bf16 autocast (random encoder); '' = none",
    )
    p.add_argument("--no-moma-loop", dest="moma_loop", action="store_false")
    p.add_argument(
        "--adamw",
        choices=["fused", "foreach", "for-loop"],
        default="fused",
        help="the peers' AdamW (ours is always the Trainer's: fused)",
    )
    p.add_argument(
        "--profile", default="", help="tag: save top-10 op tables of joint_decoder/llava"
    )
    p.add_argument(
        "--unfused-row",
        action="store_true",
        help="add the joint_unfused_ce ablation row (logits + causal_lm_loss, outside the Trainer)",
    )
    p.add_argument("--no-flop-count", dest="flop_count", action="store_false")
    p.add_argument(
        "--compile",
        default="joint_decoder,cross_attention,moma,moma_loop,llava,mllama",
        help="models also run compiled (random encoder, float32); '' = none",
    )
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        torch.set_num_threads(args.threads)
        memory_child(args.memory_child, args)
        return

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    archs = [a for a in args.archs.split(",") if a]
    bf16 = [a for a in args.bf16.split(",") if a]
    started = load_average()
    print(f"start: {started}")
    ffn = job_config({"arch": "joint_decoder"}, "random").model.hidden_dim
    ceil = {"float32": ceiling(ffn, torch.float32)}
    if bf16:
        ceil["bfloat16"] = ceiling(ffn, torch.bfloat16)

    plans = [(enc, "float32", archs) for enc in args.encoders.split(",") if enc]
    if bf16:
        plans.append(("random", "bfloat16", bf16))
    all_runners: list[Runner] = []
    profiles: dict[str, str] = {}
    to_compile = {a for a in args.compile.split(",") if a}
    for group, dtype, group_archs in plans:
        runners = build_runners(group, dtype, group_archs, args)
        if to_compile and group == "random" and dtype == "float32":
            runners += compiled_copies(runners, to_compile, args)
        print(f"[{group}/{dtype}] {', '.join(r.name for r in runners)}: {load_average()}")
        run_group(runners, args.warmup, args.steps, args.flop_count)
        if args.profile and group == "random" and dtype == "float32":
            for r in runners:
                if r.name in ("joint_decoder", "joint_decoder+compile", "llava"):
                    profiles[r.name] = profile_step(r, out, args.profile)
        all_runners.extend(runners)
    ceil_end = ceiling(ffn, torch.float32)
    ceil["float32"] = {k: max(v, ceil_end[k]) for k, v in ceil["float32"].items()}
    finished = load_average()
    print(f"peak memory, one child process per model ({len(all_runners)}):")
    memory_in_children(all_runners, args)

    rows = summarize(all_runners, ceil)
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, AdamW({args.adamw}), "
        f"steps={args.steps} (warm-up {args.warmup})"
    )
    print(
        "matmul ceiling GFLOP/s: "
        + "; ".join(
            f"{dt}: " + ", ".join(f"{k} {v:.0f}" for k, v in c.items()) for dt, c in ceil.items()
        )
    )
    table = print_table(rows)
    for name, tab in profiles.items():
        print(f"\n=== profile {name} ({args.profile}) ===\n{tab}")
    print(f"load at start: {started}\nload at end:   {finished}")
    result = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "adamw": args.adamw,
        "load_start": started,
        "load_end": finished,
        "ceiling_gflops": ceil,
        "rows": rows,
        "table": table,
    }
    (out / "bench_vlm.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "bench_vlm.png")
    print(f"wrote {out / 'bench_vlm.json'} and {out / 'bench_vlm.png'}")


if __name__ == "__main__":
    main()
