"""``build_parallel_vlm``: meta-device construction -> AC -> FSDP2 -> materialise -> init."""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from vlm_config import JobConfig
from vlm_parallel.activation import apply_activation_checkpointing
from vlm_parallel.compile import apply_compile
from vlm_parallel.dist import DistContext
from vlm_parallel.fsdp import apply_fsdp
from vlm_strategies import VLMWrapper, apply_freeze, build_vlm
from vlm_transformer.hf import load_hf_decoder_weights

__all__ = ["build_parallel_vlm", "encoder_ever_trainable", "materialize"]


def encoder_ever_trainable(model: VLMWrapper, job: JobConfig) -> bool:
    """Whether the vision encoder has a trainable parameter at step 0 or at any
    ``arch.freeze_schedule`` stage (such an encoder must be sharded from the start so
    that its gradients are reduced once it unfreezes).  Leaves the step-0 freeze state."""
    encoder_params = list(model.vision_encoder.parameters())
    if not encoder_params:
        return False
    steps = sorted({0, *(stage.step for stage in job.arch.freeze_schedule)})
    trainable = False
    for step in steps:
        apply_freeze(model, job.arch, step)
        trainable = trainable or any(p.requires_grad for p in encoder_params)
    apply_freeze(model, job.arch, 0)
    return trainable


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate every meta-device child of ``model`` on ``device`` (``to_empty``: values
    are garbage until initialised) and move the other children there.

    Only children holding meta tensors are emptied, so the vision encoder keeps its
    loaded weights and non-persistent buffers.
    """
    for child in model.children():
        tensors = _tensors(child)
        if any(t.is_meta for t in tensors):
            child.to_empty(device=device)
        elif any(t.device != device for t in tensors):
            child.to(device)
    for name, param in list(model.named_parameters(recurse=False)):
        if param.is_meta:
            raise RuntimeError(f"root parameter {name} on meta cannot be materialised")


@torch.no_grad()
def _sync_buffers(model: nn.Module, reference: nn.Module | None, ctx: DistContext) -> None:
    """Copy every buffer (persistent or not, e.g. rotary tables) from ``reference``
    (rank 0) and broadcast it to the other ranks."""
    ref_buffers = dict(reference.named_buffers()) if reference is not None else {}
    for name, buf in model.named_buffers():
        if reference is not None:
            buf.copy_(ref_buffers[name])
        if ctx.distributed:
            tdist.broadcast(buf, src=0)


def build_parallel_vlm(job: JobConfig, dist: DistContext, seed: int | None = None) -> VLMWrapper:
    """Build ``job``'s VLM ready to train on this rank, the same way for 1 or N processes.

    1. ``torch.manual_seed(seed)``; ``build_vlm(job, init_device="meta")`` (adapter,
       decoder and frame positions on meta; the encoder with its real weights).
    2. :func:`apply_activation_checkpointing` with ``job.parallel.activation_checkpointing``,
       then :func:`apply_compile` of every trunk block when ``job.parallel.compile``.
    3. :func:`apply_fsdp` on the meta model (no-op with one process); the encoder is
       sharded when it is trainable at step 0 or at any freeze-schedule stage.
    4. :func:`materialize` on ``dist.device``.
    5. The full weights are initialised once, on rank 0, by building the same model on
       the CPU after ``torch.manual_seed(seed)`` (``build_vlm(job)``), and broadcast into
       the shards with ``set_model_state_dict(..., full_state_dict=True,
       broadcast_from_rank0=True)``; buffers (incl. non-persistent rotary tables) are
       copied and broadcast too.  One process loads the same values directly, so a
       model initialised on N processes equals the single-process one.  With
       ``job.model.pretrained`` the rank-0 reference first gets the decoder weights of
       that Hugging Face folder (:func:`vlm_transformer.hf.load_hf_decoder_weights`,
       strict), so the shards are filled with them.
    6. The step-0 freeze state of ``job.arch`` is applied; finally every rank reseeds
       with ``seed`` so all ranks leave with the same RNG state.

    Args:
        job: the validated job config.
        dist: from :func:`init_distributed`.
        seed: initialisation seed; default ``job.train.seed``.

    Raises:
        ValueError: ``job.model.pretrained`` weights that do not fit the decoder.
        FileNotFoundError: ``job.model.pretrained`` names no folder with ``config.json``.
    """
    seed = job.train.seed if seed is None else seed
    torch.manual_seed(seed)
    model = build_vlm(job, init_device="meta")
    apply_activation_checkpointing(model, job.parallel.activation_checkpointing)
    apply_compile(model, job.parallel.compile)
    shard_encoder = encoder_ever_trainable(model, job)
    apply_fsdp(model, job.parallel, dist, shard_encoder=shard_encoder)
    materialize(model, dist.device)

    reference: VLMWrapper | None = None
    if dist.is_main:
        torch.manual_seed(seed)
        reference = build_vlm(job, init_device="cpu")
        if job.model.pretrained is not None:
            load_hf_decoder_weights(reference.transformer, job.model.pretrained)
    if dist.distributed:
        full = reference.state_dict() if reference is not None else {}
        set_model_state_dict(
            model,
            full,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True),
        )
    else:
        assert reference is not None
        model.load_state_dict(reference.state_dict(), strict=True)
    _sync_buffers(model, reference, dist)
    del reference
    apply_freeze(model, job.arch, step=0)
    model.train()
    torch.manual_seed(seed)
    return model
