"""The ``random`` stub encoder."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_encoders import RandomEncoder, RandomEncoderConfig, VisionEncoder, build_random_encoder


def make(**kw: int) -> RandomEncoder:
    return build_random_encoder(RandomEncoderConfig(**kw))


def test_shapes_and_prediction_agree() -> None:
    cfg = RandomEncoderConfig(num_tokens=10, feature_dim=24, image_size=20)
    enc = build_random_encoder(cfg)
    assert isinstance(enc, VisionEncoder)
    out = enc(torch.randn(3, 3, 20, 20))
    assert out.shape == (3, 10, 24)
    assert cfg.predicted_num_tokens() == enc.num_tokens == out.shape[1] == 10
    assert cfg.predicted_feature_dim() == enc.feature_dim == out.shape[2] == 24
    assert enc.preprocessing.image_size == 20
    assert enc.grid_size is None
    assert make(num_tokens=16).grid_size == 4


def test_weight_free() -> None:
    enc = make()
    assert list(enc.parameters()) == []
    assert enc.state_dict() == {}
    assert {n for n, _ in enc.named_buffers()} == {"w_in", "mix", "pos"}


def test_same_image_same_features_across_instances_and_batches() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    a, b = make(seed=7), make(seed=7)
    full = a(x)
    assert torch.equal(full, b(x))
    # an image gives the same features alone or inside any batch
    alone = a(x[2:3])
    torch.testing.assert_close(alone[0], full[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(a(x.flip(0)), full.flip(0), rtol=0, atol=1e-6)
    # the global RNG plays no part
    torch.manual_seed(123)
    assert torch.equal(make(seed=7)(x), full)


def test_different_images_and_seeds_give_different_features() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    enc = make()
    out = enc(x)
    assert not torch.allclose(out[0], out[1])
    y = x.clone()
    y[0, 1, 5, 7] += 0.5  # one pixel of one image
    out_y = enc(y)
    assert not torch.allclose(out_y[0], out[0])
    assert torch.equal(out_y[1], out[1])
    assert not torch.allclose(make(seed=1)(x), out)
    # tokens differ from one another (not one vector repeated)
    assert not torch.allclose(out[0, 0], out[0, 1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_any_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    ref = make()(x)
    enc = make().to(dtype)
    out = enc(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    # float32 input into a cast module comes out in the module's dtype
    assert enc(x).dtype == dtype


def test_meta_device_then_reset_parameters() -> None:
    x = torch.randn(1, 3, 32, 32)
    ref = make(seed=5)(x)
    with torch.device("meta"):
        enc = make(seed=5)
    assert enc.w_in.is_meta
    enc.to_empty(device="cpu")
    enc.reset_parameters()
    assert torch.equal(enc(x), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    x = torch.randn(2, 3, 32, 32)
    ref = make()(x)
    out = make().cuda()(x.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 3, 32), r"\(B, 3, 32, 32\)"),
        ((2, 1, 32, 32), r"\(B, 3, 32, 32\)"),
        ((2, 3, 32, 31), r"\(B, 3, 32, 32\), got \(2, 3, 32, 31\)"),
        ((2, 3, 64, 64), r"\(B, 3, 32, 32\)"),
        ((1, 2, 3, 32, 32), "fold video frames"),
    ],
)
def test_bad_input_shape(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()(torch.zeros(shape))


def test_integer_pixels_rejected() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        make()(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_preprocess_pil_images() -> None:
    pil = pytest.importorskip("PIL.Image")
    enc = make(image_size=16)
    white = pil.new("RGB", (40, 20), (255, 255, 255))
    black = pil.new("L", (7, 9), 0)
    pixels = enc.preprocess([white, black])
    assert pixels.shape == (2, 3, 16, 16)
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0], torch.ones(3, 16, 16))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(pixels[1], -torch.ones(3, 16, 16))
    assert enc(pixels).shape == (2, 64, 192)
    assert enc.preprocess(white).shape == (1, 3, 16, 16)


@settings(max_examples=15, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    feature_dim=st.integers(1, 24),
    image_size=st.integers(1, 40),
    batch=st.integers(1, 3),
)
def test_any_geometry(num_tokens: int, feature_dim: int, image_size: int, batch: int) -> None:
    enc = make(num_tokens=num_tokens, feature_dim=feature_dim, image_size=image_size)
    out = enc(torch.rand(batch, 3, image_size, image_size))
    assert out.shape == (batch, num_tokens, feature_dim)
    assert torch.isfinite(out).all()
