"""``VisionFeatures``: the encoder's output fed instead of pixels skips the encoder and
gives bit-identical prefix-layout outputs (loss, logits, gradients, generation) for
every built-in arch, images and clips."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from strategies_helpers import BUILTIN_ARCHS, SIGLIP_ENCODER, tiny_job

from vlm_strategies import VisionFeatures, apply_freeze, build_vlm

FROZEN = [{"module": "vision_encoder"}]


def _model(arch: dict[str, Any], **extra: Any) -> Any:
    torch.manual_seed(0)
    job = tiny_job({**arch, "freeze": FROZEN, **extra}, SIGLIP_ENCODER)
    model = build_vlm(job)
    apply_freeze(model, job.arch)
    return model.train()


def _no_encoder(model: Any) -> None:
    def refuse(*_args: Any) -> None:
        raise AssertionError("the encoder ran although features were given")

    model.vision_encoder.forward = refuse


def _grads(model: Any) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("arch", BUILTIN_ARCHS, ids=lambda a: a["arch"])
def test_images_bit_identical(arch: dict[str, Any]) -> None:
    model = _model(arch)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 16, 16, generator=gen)
    ids = torch.randint(1, 64, (3, 12), generator=gen)
    with torch.no_grad():
        features = VisionFeatures(model.vision_encoder(pixels))
    live = model.loss(pixels, ids, ids)
    live.backward()
    live_grads = _grads(model)
    live_logits, _ = model(pixels, ids)
    _no_encoder(model)
    cached = model.loss(features, ids, ids)
    cached.backward()
    assert torch.equal(cached, live)
    cached_grads = _grads(model)
    assert cached_grads.keys() == live_grads.keys() and live_grads
    assert not any(n.startswith("vision_encoder.") for n in cached_grads)
    for name, grad in live_grads.items():
        assert torch.equal(cached_grads[name], grad), name
    assert torch.equal(model(features, ids)[0], live_logits)


@pytest.mark.parametrize("arch", BUILTIN_ARCHS, ids=lambda a: a["arch"])
def test_clips_with_padded_frames_bit_identical(arch: dict[str, Any]) -> None:
    model = _model(arch, frames_per_clip=3, frame_positions="learned")
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 3, 16, 16, generator=gen)
    frame_mask = torch.tensor([[True, True, False], [True, False, False]])
    ids = torch.randint(1, 64, (2, 12), generator=gen)
    with torch.no_grad():
        folded = model.vision_encoder(pixels.flatten(0, 1))
    features = VisionFeatures(folded.view(2, 3, *folded.shape[1:]))
    live = model.loss(pixels, ids, ids, frame_mask)
    _no_encoder(model)
    assert torch.equal(model.loss(features, ids, ids, frame_mask), live)


@pytest.mark.parametrize("arch", BUILTIN_ARCHS, ids=lambda a: a["arch"])
def test_generate_same_tokens(arch: dict[str, Any]) -> None:
    model = _model(arch)
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 16, 16, generator=gen)
    prompt = torch.randint(1, 64, (2, 3), generator=gen)
    with torch.no_grad():
        features = VisionFeatures(model.vision_encoder(pixels))
    live = model.generate(pixels, prompt, max_new_tokens=5)
    _no_encoder(model)
    assert torch.equal(model.generate(features, prompt, max_new_tokens=5), live)


def test_mismatched_features_are_refused() -> None:
    model = _model(BUILTIN_ARCHS[0])
    ids = torch.randint(1, 64, (2, 12))
    n, dv = model.vision_encoder.num_tokens, model.vision_encoder.feature_dim
    with pytest.raises(ValueError, match="features computed by another encoder"):
        model.loss(VisionFeatures(torch.zeros(2, n, dv + 1)), ids, ids)
    with pytest.raises(ValueError, match="2 frame.*frames_per_clip=1"):
        model.loss(VisionFeatures(torch.zeros(2, 2, n, dv)), ids, ids)
    with pytest.raises(ValueError, match=r"\(B, N, Dv\) image features"):
        VisionFeatures(torch.zeros(2, n, dv, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got \(2, 3\)"):
        VisionFeatures(torch.zeros(2, 3))
