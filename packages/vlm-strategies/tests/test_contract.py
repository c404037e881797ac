"""The arch plugin contract: one ``prepare`` path, explicit ``decode_context``, generate's
``use_cache``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import pytest
import torch
from strategies_helpers import tiny_job
from torch import Tensor

from vlm_config import ArchConfig, get_registry
from vlm_strategies import (
    ArchImplementation,
    PrefixArchImplementation,
    VLMWrapper,
    build_vlm,
    causal_lm_loss,
)
from vlm_strategies.archs.cross_attention.impl import CrossAttentionTrunk
from vlm_strategies.archs.joint_decoder.impl import JointDecoder
from vlm_strategies.archs.moma.impl import MoMa
from vlm_transformer import KVCache, ModalityContext


def inputs(b: int = 2, s: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 64, (b, s), generator=g)


def greedy(model: VLMWrapper, pixels: Tensor, ids: Tensor, steps: int) -> Tensor:
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(pixels, seq)
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return seq


# ------------------------------------------------------------- 1. generate(use_cache=...)


@pytest.mark.parametrize("arch", ["joint_decoder", "cross_attention"])
def test_generate_use_cache_false_recomputes_the_same_tokens(arch: str) -> None:
    torch.manual_seed(0)
    model = build_vlm(tiny_job({"arch": arch})).eval()
    pixels, ids = inputs()
    cached = model.generate(pixels, ids, max_new_tokens=5)
    recomputed = model.generate(pixels, ids, max_new_tokens=5, use_cache=False)
    forced = model.generate(pixels, ids, max_new_tokens=5, use_cache=True)
    assert torch.equal(cached, recomputed) and torch.equal(cached, forced)
    assert torch.equal(cached, greedy(model, pixels, ids, 5))


def test_generate_rejects_a_cache_for_non_incremental_archs_and_arch_owned_kwargs() -> None:
    model = build_vlm(tiny_job({"arch": "moma", "experts_per_modality": 2}))
    pixels, ids = inputs()
    with pytest.raises(ValueError, match=r"MoMa sets incremental_decoding = False.*use_cache"):
        model.generate(pixels, ids, max_new_tokens=2, use_cache=True)
    assert model.generate(pixels, ids, max_new_tokens=2, use_cache=False).shape == (2, 6)
    with pytest.raises(TypeError, match="decode_context_fn"):
        model.generate(pixels, ids, max_new_tokens=2, decode_context_fn=lambda *a: None)


# ------------------------------------------------------- 2. decode_context is explicit


class SideConfig(ArchConfig):
    """Test-only arch: images read from the side by cross-attention blocks."""

    arch: Literal["test_side"] = "test_side"
    implementation: ClassVar[str] = f"{__name__}:ForgetfulSide"

    def residual_image_positions(self, num_visual_tokens: int) -> int:
        return 0


class ForgetfulSide(ArchImplementation):
    """Deliberately incomplete: side inputs, no ``decode_context``."""

    def build_trunk(self) -> CrossAttentionTrunk:
        return CrossAttentionTrunk(self.model_config, 1, self.model_config.kv_heads)

    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        return ModalityContext(image_features=image_embeds, image_mask=image_valid)


class MisdeclaredPrefix(PrefixArchImplementation, ForgetfulSide):
    """Deliberately wrong: claims the prefix layout but reads images from the side."""


class FixedSide(ForgetfulSide):
    def decode_context(
        self, image_embeds: Tensor, image_valid: Tensor | None, new_ids: Tensor, cache: KVCache
    ) -> ModalityContext:
        return self.context(image_embeds, image_valid, new_ids)


class NonCausalSide(ForgetfulSide):
    incremental_decoding = False


@pytest.fixture
def side_arch() -> Iterator[None]:
    get_registry().register("archs", SideConfig, replace=True)
    try:
        yield
    finally:
        SideConfig.implementation = f"{__name__}:ForgetfulSide"
        get_registry().unregister("archs", "test_side")


def build_side(impl: str) -> VLMWrapper:
    SideConfig.implementation = f"{__name__}:{impl}"
    torch.manual_seed(0)
    model = build_vlm(tiny_job({"arch": "test_side"}))
    with torch.no_grad():  # open the zero-initialised cross blocks
        for p in model.transformer.trunk.cross_layers.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.usefixtures("side_arch")
def test_a_side_input_arch_without_decode_context_fails_at_build() -> None:
    with pytest.raises(
        TypeError,
        match=r"test_contract\.ForgetfulSide must implement decode_context\(\).*"
        r"PrefixArchImplementation",
    ):
        build_side("ForgetfulSide")


@pytest.mark.usefixtures("side_arch")
def test_a_misdeclared_prefix_arch_fails_at_the_first_decode_step() -> None:
    model = build_side("MisdeclaredPrefix")
    pixels, ids = inputs()
    logits, _ = model(pixels, ids)  # trains fine...
    assert torch.isfinite(logits).all()
    with pytest.raises(TypeError, match=r"MisdeclaredPrefix subclasses PrefixArch.*image_features"):
        model.generate(pixels, ids, max_new_tokens=3)  # ...but never generates silently wrong
    # the same arch decodes correctly once it implements decode_context (or recomputes)
    for impl in ("FixedSide", "NonCausalSide"):
        model = build_side(impl)
        assert torch.equal(
            model.generate(pixels, ids, max_new_tokens=4), greedy(model, pixels, ids, 4)
        )


# ------------------------------------------------------------ 3. one prepare() path


class FlippedJoint(JointDecoder):
    """Overrides the strategy entry point: the image prefix in reverse order, doubled."""

    calls: ClassVar[list[int]] = []

    def prepare(
        self,
        wrapper: VLMWrapper,
        pixel_values: Tensor,
        input_ids: Tensor,
        frame_mask: Tensor | None = None,
    ) -> ModalityContext:
        FlippedJoint.calls.append(input_ids.shape[1])
        embeds, valid = wrapper.encode_images(pixel_values, frame_mask)
        return self.context(embeds.flip(1) * 2, valid, input_ids)


class FlippedMoMa(MoMa):
    calls: ClassVar[list[int]] = []

    def prepare(
        self,
        wrapper: VLMWrapper,
        pixel_values: Tensor,
        input_ids: Tensor,
        frame_mask: Tensor | None = None,
    ) -> ModalityContext:
        FlippedMoMa.calls.append(input_ids.shape[1])
        embeds, valid = wrapper.encode_images(pixel_values, frame_mask)
        return self.context(embeds.flip(1) * 2, valid, input_ids)


@pytest.mark.parametrize(
    ("arch", "impl"),
    [
        ({"arch": "joint_decoder"}, FlippedJoint),
        ({"arch": "moma", "experts_per_modality": 2}, FlippedMoMa),
    ],
    ids=["cached", "recompute"],
)
def test_an_overridden_prepare_is_honoured_by_forward_loss_and_generate(
    arch: dict[str, Any],
    impl: type[FlippedJoint] | type[FlippedMoMa],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = build_vlm(tiny_job(arch)).eval()
    plain_strategy = model.strategy
    model.strategy = impl(model.strategy.config, model.strategy.model_config)
    pixels, ids = inputs(s=5)
    impl.calls.clear()
    with torch.no_grad():
        logits, _ = model(pixels, ids)
        loss = model.loss(pixels, ids, ids)
    assert impl.calls == [5, 5]
    torch.testing.assert_close(loss, causal_lm_loss(logits, ids), atol=1e-5, rtol=1e-5)
    model.strategy = plain_strategy
    with torch.no_grad():
        assert not torch.allclose(model(pixels, ids)[0], logits, atol=1e-4)  # it matters
    model.strategy = impl(plain_strategy.config, plain_strategy.model_config)

    encoded: list[int] = []
    original = VLMWrapper._encode_images

    def counting(self: VLMWrapper, *args: Any) -> tuple[Tensor, Tensor | None]:
        encoded.append(1)
        return original(self, *args)

    monkeypatch.setattr(VLMWrapper, "_encode_images", counting)
    for use_cache in (None, False):
        impl.calls.clear()
        encoded.clear()
        out = model.generate(pixels, ids, max_new_tokens=4, use_cache=use_cache)
        cached = model.strategy.incremental_decoding and use_cache is None
        # prefill only with the cache; prefill + every recomputed step without
        assert impl.calls == ([5] if cached else [5, 6, 7, 8])
        assert encoded == [1]  # images encoded once per generate call
        assert torch.equal(out, greedy(model, pixels, ids, 4))
