"""The arch-agnostic core: wrapper, build, video, dtypes, freezing, in-process archs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
from strategies_helpers import SIGLIP_ENCODER, tiny_job
from torch import Tensor

from vlm_config import ArchConfig, get_registry
from vlm_strategies import (
    PrefixArchImplementation,
    VLMWrapper,
    apply_freeze,
    build_vlm,
    causal_lm_loss,
    expand_frame_mask,
    freeze_specs_at,
    trainable_parameter_names,
    unwrap_transformer,
)
from vlm_transformer import ModalityContext, Transformer

JOINT = {"arch": "joint_decoder"}


def batch(b: int = 2, s: int = 12, frames: int | None = None) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (b, 3, 16, 16) if frames is None else (b, frames, 3, 16, 16)
    return torch.randn(shape, generator=g), torch.randint(0, 64, (b, s), generator=g)


def test_joint_decoder_shapes_and_exact_token_count() -> None:
    torch.manual_seed(0)
    model = build_vlm(tiny_job(JOINT))
    assert isinstance(model, VLMWrapper)
    assert model.num_image_tokens == 16 and model.num_image_positions == 16
    pixels, ids = batch()
    logits, labels = model(pixels, ids, labels=ids)
    assert logits.shape == (2, 12, 64) and labels is ids
    loss = causal_lm_loss(logits, ids)
    loss.backward()
    assert all(p.grad is not None for p in model.transformer.parameters())
    assert all(p.grad is not None for p in model.adapter.parameters())


def test_loss_rejects_misaligned_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must be \(B, S\)"):
        causal_lm_loss(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def test_frame_count_mismatch_names_both_numbers() -> None:
    model = build_vlm(tiny_job({**JOINT, "frames_per_clip": 3}, max_seq_len=128))
    pixels, ids = batch(frames=2)
    with pytest.raises(ValueError, match=r"2 frame\(s\).*frames_per_clip=3"):
        model(pixels, ids)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) images or \(B, F, 3, H, W\)"):
        model(torch.randn(2, 16, 16), ids)


def test_frame_mask_expansion() -> None:
    mask = torch.tensor([[True, False, True]])
    assert expand_frame_mask(mask, 1, 3, 6).tolist() == [[1, 1, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="cannot be split evenly over 3 frames"):
        expand_frame_mask(mask, 1, 3, 7)
    with pytest.raises(ValueError, match=r"frame_mask must be \(B, F\) = \(2, 3\)"):
        expand_frame_mask(mask, 2, 3, 6)


def test_video_tokens_and_frame_positions() -> None:
    torch.manual_seed(0)
    model = build_vlm(tiny_job({**JOINT, "frames_per_clip": 3}))
    assert model.num_image_tokens == 48 and model.frame_positions is not None
    pixels, _ids = batch(frames=3)
    embeds, valid = model.encode_images(pixels, torch.tensor([[True, True, False]] * 2))
    assert embeds.shape == (2, 48, 32) and valid is not None and valid.shape == (2, 48)
    assert torch.all(embeds[:, 32:] == 0)
    # swapping two frames changes the tokens beyond a permutation: frame order is encoded
    swapped = pixels[:, [1, 0, 2]]
    e1, _ = model.encode_images(pixels)
    e2, _ = model.encode_images(swapped)
    assert not torch.allclose(e1[:, :16], e2[:, 16:32])
    off = build_vlm(tiny_job({**JOINT, "frames_per_clip": 3, "frame_positions": "none"}))
    assert off.frame_positions is None


def test_mixed_dtypes_encoder_float32_decoder_bf16() -> None:
    torch.manual_seed(0)
    model = build_vlm(tiny_job(JOINT, encoder=SIGLIP_ENCODER))
    model.adapter.to(torch.bfloat16)
    model.transformer.to(torch.bfloat16)
    assert next(model.vision_encoder.parameters()).dtype == torch.float32
    pixels, ids = batch()
    logits, _ = model(pixels, ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_sequence_budget_rechecked_at_build() -> None:
    job = tiny_job(JOINT, max_seq_len=28)
    assert job.sequence_budget().total == 28
    with pytest.raises(ValueError, match="sequence budget exceeded"):
        from vlm_strategies import build_vlm_from_configs

        arch = job.arch.model_copy(update={"max_text_len": 13})
        build_vlm_from_configs(job.encoder, job.adapter, arch, job.model)


def test_freeze_aliases_patterns_and_schedule() -> None:
    torch.manual_seed(0)
    job = tiny_job(
        {
            **JOINT,
            "freeze": [
                {"module": "vision_encoder"},
                {"module": "transformer"},
                {"module": "transformer.trunk.layers.1.*", "frozen": False},
            ],
            "freeze_schedule": [{"step": 3, "freeze": [{"module": "adapter"}]}],
        },
        encoder=SIGLIP_ENCODER,
    )
    model = build_vlm(job)
    names = trainable_parameter_names(model)
    assert not any(n.startswith("vision_encoder.") for n in names)
    assert any(n.startswith("adapter.") for n in names)
    assert {n for n in names if n.startswith("transformer.")} == {
        n for n, _ in model.named_parameters() if n.startswith("transformer.trunk.layers.1.")
    }
    assert model.encoder_frozen and not model.vision_encoder.training
    model.train()
    assert not model.vision_encoder.training  # a frozen encoder stays in eval mode
    pixels, ids = batch()
    logits, _ = model(pixels, ids)
    causal_lm_loss(logits, ids).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names), n
    # at step 3 the schedule replaces the specs: only the adapter is frozen
    assert [s.module for s in freeze_specs_at(job.arch, 2)] == [
        "vision_encoder",
        "transformer",
        "transformer.trunk.layers.1.*",
    ]
    assert apply_freeze(model, job.arch, step=3)
    names = trainable_parameter_names(model)
    assert not any(n.startswith("adapter.") for n in names)
    assert any(n.startswith("vision_encoder.") for n in names) and not model.encoder_frozen
    assert not apply_freeze(model, job.arch, step=4)  # nothing changes within a stage


def test_unknown_raw_pattern_is_an_error() -> None:
    model = build_vlm(tiny_job(JOINT))
    from vlm_config import FreezeSpec

    with pytest.raises(ValueError, match=r"'transformer\.nope\.\*' matches no parameter"):
        apply_freeze(model, model.strategy.config, specs=[FreezeSpec(module="transformer.nope.*")])


def test_unwrap_transformer() -> None:
    model = build_vlm(tiny_job(JOINT))
    assert unwrap_transformer(model) is model.transformer
    assert unwrap_transformer(model.transformer) is model.transformer
    assert unwrap_transformer(torch.compile(model)) is model.transformer
    with pytest.raises(TypeError, match="no vlm_transformer.Transformer"):
        unwrap_transformer(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- in-process arch


class MeanPrefixConfig(ArchConfig):
    """Test-only arch: one prefix position holding the mean visual token."""

    arch: Literal["test_mean_prefix"] = "test_mean_prefix"
    implementation: ClassVar[str] = f"{__name__}:MeanPrefix"

    def residual_image_positions(self, num_visual_tokens: int) -> int:
        return 1


class MeanPrefix(PrefixArchImplementation):
    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        return ModalityContext(prefix_embeds=image_embeds.mean(dim=1, keepdim=True))


def test_in_process_arch_trains_end_to_end() -> None:
    registry = get_registry()
    registry.register("archs", MeanPrefixConfig, replace=True)
    try:
        torch.manual_seed(0)
        job = tiny_job({"arch": "test_mean_prefix"})
        assert job.sequence_budget().image_positions == 1
        model = build_vlm(job)
        assert model.num_image_positions == 1
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        pixels, ids = batch()
        losses = []
        for _ in range(3):
            logits, _ = model(pixels, ids)
            loss = causal_lm_loss(logits, ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        out = model.generate(pixels, ids[:, :3], max_new_tokens=4)
        assert out.shape == (2, 7)
    finally:
        registry.unregister("archs", "test_mean_prefix")


CORE_FILES = [
    "api.py",
    "wrapper.py",
    "build.py",
    "freezing.py",
    "video.py",
    "unwrap.py",
    "media.py",
    "testing.py",
]
ARCH_NAMES = re.compile(r"joint_decoder|cross_attention|\bmot\b|\bmoma\b|mixture", re.IGNORECASE)


def test_core_names_no_arch() -> None:
    src = Path(__file__).parents[1] / "src" / "vlm_strategies"
    transformer_src = Path(Transformer.__module__ and __import__("vlm_transformer").__file__).parent
    files = [src / f for f in CORE_FILES] + sorted(transformer_src.glob("*.py"))
    offenders = [
        f"{f.name}:{i}: {line.strip()}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if ARCH_NAMES.search(line)
    ]
    assert offenders == []
