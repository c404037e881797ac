"""Hugging Face towers: tiny random-init models saved to tmp folders and loaded back offline."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

transformers = pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")

from vlm_encoders import (  # noqa: E402
    ClipEncoderConfig,
    HFVisionEncoder,
    Siglip2EncoderConfig,
    SiglipEncoderConfig,
    VisionEncoder,
    build_hf_encoder,
)
from vlm_encoders.hf import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402

VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
TEXT = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 64,
    "max_position_embeddings": 16,
}
SIGLIP2 = {k: v for k, v in VISION.items() if k != "image_size"} | {"num_patches": 16}


def _save(model: Any, folder: Path, processor: Any = None) -> Path:
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """family -> (folder, the reference transformers model that was saved)."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    out: dict[str, tuple[Path, Any]] = {}
    tf = transformers
    vis = tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)).eval()
    out["siglip"] = (_save(vis, root / "siglip"), vis)

    dual = tf.SiglipModel(tf.SiglipConfig(vision_config=VISION, text_config=TEXT)).eval()
    proc = tf.SiglipImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]
    )
    out["siglip_dual"] = (_save(dual, root / "siglip_dual", proc), dual.vision_model)

    clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)).eval()
    out["clip"] = (_save(clip, root / "clip"), clip)

    clip_dual = tf.CLIPModel(tf.CLIPConfig(vision_config=VISION, text_config=TEXT)).eval()
    clip_proc = tf.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    out["clip_dual"] = (_save(clip_dual, root / "clip_dual", clip_proc), clip_dual.vision_model)

    s2 = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**SIGLIP2)).eval()
    s2_proc = tf.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    out["siglip2"] = (_save(s2, root / "siglip2", s2_proc), s2)
    return out


def pixels(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen)


@torch.no_grad()
def ref_hidden(model: Any, x: torch.Tensor, **kw: Any) -> Any:
    return model(pixel_values=x, output_hidden_states=True, **kw)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("key", ["siglip", "siglip_dual"])
@pytest.mark.parametrize(
    ("feature_layer", "post_ln"),
    [(-1, False), (-1, True), (-2, False), (-2, True), (0, False), (1, False)],
)
def test_siglip_equals_transformers(
    saved: dict, key: str, feature_layer: int, post_ln: bool
) -> None:
    folder, ref = saved[key]
    cfg = SiglipEncoderConfig(path=str(folder), feature_layer=feature_layer, post_layernorm=post_ln)
    enc = build_hf_encoder(cfg).eval()
    assert isinstance(enc, (HFVisionEncoder, VisionEncoder))
    x = pixels()
    with torch.no_grad():
        out = enc(x)
    hs = ref_hidden(ref, x)
    want = hs.hidden_states[feature_layer]
    if post_ln:
        want = ref.post_layernorm(want)
    close(out, want)
    if feature_layer == -1 and post_ln:
        close(out, hs.last_hidden_state)  # SigLIP's own last_hidden_state
    assert cfg.predicted_num_tokens() == enc.num_tokens == out.shape[1] == 16
    assert cfg.predicted_feature_dim() == enc.feature_dim == out.shape[2] == 32
    # layers after feature_layer and the pooling head are dropped
    kept = feature_layer % 4
    assert len(enc.tower.encoder.layers) == kept
    names = [n for n, _ in enc.named_parameters()]
    assert not any(".head." in n for n in names)
    assert any(n.startswith("post_layernorm.") for n in names) == post_ln


def test_siglip_dual_tower_uses_vision_part_and_folder_processor(saved: dict) -> None:
    folder, ref = saved["siglip_dual"]
    enc = build_hf_encoder(SiglipEncoderConfig(path=str(folder)))
    # the folder's preprocessor_config.json wins over the SigLIP defaults
    assert enc.preprocessing.mean == pytest.approx((0.1, 0.2, 0.3))
    assert enc.preprocessing.std == pytest.approx((0.4, 0.5, 0.6))
    assert enc.preprocessing.image_size == 32
    # loaded weights are the saved vision tower's, not a fresh init
    sd = enc.tower.state_dict()
    ref_sd = ref.state_dict()
    for name, value in sd.items():
        assert torch.equal(value, ref_sd[name]), name
    assert not any(n.startswith("text_model") for n in sd)
    images = [PIL_Image.new("RGB", (50, 40), (200, 10, 30)), PIL_Image.new("RGB", (32, 32))]
    px = enc.preprocess(images)
    proc = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    assert torch.equal(px, proc(images=images, return_tensors="pt")["pixel_values"])
    assert px.shape == (2, 3, 32, 32)
    assert enc(px).shape == (2, 16, 32)


def test_siglip_defaults_without_processor_config(saved: dict) -> None:
    folder, _ = saved["siglip"]
    assert not (folder / "preprocessor_config.json").exists()
    enc = build_hf_encoder(SiglipEncoderConfig(path=str(folder)))
    assert enc.preprocessing.mean == (0.5, 0.5, 0.5)
    assert enc.preprocessing.std == (0.5, 0.5, 0.5)
    img = PIL_Image.new("RGB", (64, 48), (255, 0, 0))
    px = enc.preprocess(img)
    assert px.shape == (1, 3, 32, 32)
    torch.testing.assert_close(px[0, 0], torch.ones(32, 32))
    torch.testing.assert_close(px[0, 1], -torch.ones(32, 32))


# ---------------------------------------------------------------- CLIP


@pytest.mark.parametrize("key", ["clip", "clip_dual"])
@pytest.mark.parametrize(
    ("feature_layer", "post_ln"), [(-1, False), (-2, False), (-2, True), (0, False)]
)
def test_clip_strips_cls_and_equals_transformers(
    saved: dict, key: str, feature_layer: int, post_ln: bool
) -> None:
    folder, ref = saved[key]
    cfg = ClipEncoderConfig(path=str(folder), feature_layer=feature_layer, post_layernorm=post_ln)
    enc = build_hf_encoder(cfg).eval()
    x = pixels(seed=1)
    with torch.no_grad():
        out = enc(x)
    hs = ref_hidden(ref, x)
    assert hs.hidden_states[feature_layer].shape[1] == 17  # CLS + 16 patches
    want = hs.hidden_states[feature_layer][:, 1:]
    if post_ln:
        want = ref.post_layernorm(want)
    close(out, want)
    if feature_layer == -1:
        close(out, hs.last_hidden_state[:, 1:])
    assert cfg.predicted_num_tokens() == enc.num_tokens == out.shape[1] == 16
    assert enc.grid_size == 4


def test_clip_preprocessing(saved: dict) -> None:
    enc = build_hf_encoder(ClipEncoderConfig(path=str(saved["clip"][0])))
    assert enc.preprocessing.mean == pytest.approx(OPENAI_CLIP_MEAN)
    assert enc.preprocessing.std == pytest.approx(OPENAI_CLIP_STD)
    dual = build_hf_encoder(ClipEncoderConfig(path=str(saved["clip_dual"][0])))
    images = [PIL_Image.new("RGB", (70, 40), (10, 120, 250))]
    proc = transformers.AutoImageProcessor.from_pretrained(
        str(saved["clip_dual"][0]), local_files_only=True
    )
    assert torch.equal(
        dual.preprocess(images), proc(images=images, return_tensors="pt")["pixel_values"]
    )


# ---------------------------------------------------------------- SigLIP2


def _siglip2_reference(ref: Any, x: torch.Tensor) -> Any:
    """transformers' own path: its patchify function, mask and spatial shapes."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    p = ref.config.patch_size
    g = x.shape[-1] // p
    patches = torch.stack([torch.from_numpy(convert_image_to_patches(img.numpy(), p)) for img in x])
    mask = torch.ones(x.shape[0], g * g, dtype=torch.int32)
    shapes = torch.tensor([[g, g]] * x.shape[0])
    return ref_hidden(ref, patches, pixel_attention_mask=mask, spatial_shapes=shapes)


@pytest.mark.parametrize(("feature_layer", "post_ln"), [(-1, True), (-1, False), (-2, False)])
def test_siglip2_equals_transformers(saved: dict, feature_layer: int, post_ln: bool) -> None:
    folder, ref = saved["siglip2"]
    cfg = Siglip2EncoderConfig(
        path=str(folder), feature_layer=feature_layer, post_layernorm=post_ln
    )
    enc = build_hf_encoder(cfg).eval()
    x = pixels(seed=2)
    with torch.no_grad():
        out = enc(x)
    hs = _siglip2_reference(ref, x)
    want = hs.last_hidden_state if post_ln else hs.hidden_states[feature_layer]
    close(out, want)
    assert cfg.predicted_num_tokens() == enc.num_tokens == out.shape[1] == 16
    assert enc.image_size == 32


def test_siglip2_other_square_grid(saved: dict) -> None:
    folder, ref = saved["siglip2"]
    cfg = Siglip2EncoderConfig(path=str(folder), image_size=16, post_layernorm=True)
    enc = build_hf_encoder(cfg).eval()
    x = pixels(size=16, seed=3)
    with torch.no_grad():
        out = enc(x)
    close(out, _siglip2_reference(ref, x).last_hidden_state)
    assert cfg.predicted_num_tokens() == enc.num_tokens == out.shape[1] == 4
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        enc(pixels(size=32))


def test_siglip2_matches_its_naflex_processor_pipeline(saved: dict) -> None:
    """A square image through transformers' Siglip2 processor + model == ours end to end."""
    folder, ref = saved["siglip2"]
    enc = build_hf_encoder(Siglip2EncoderConfig(path=str(folder), post_layernorm=True)).eval()
    gen = torch.Generator().manual_seed(4)
    arr = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
    image = PIL_Image.fromarray(arr)
    naflex = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    inputs = naflex(images=[image], return_tensors="pt")
    assert inputs["spatial_shapes"].tolist() == [[4, 4]]
    with torch.no_grad():
        want = ref(**inputs).last_hidden_state
        got = enc(enc.preprocess([image]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- inline towers, from_config, dtype


@pytest.mark.parametrize(
    ("cls", "tower", "hf_cls"),
    [
        (SiglipEncoderConfig, VISION, "SiglipVisionModel"),
        (ClipEncoderConfig, VISION, "CLIPVisionModel"),
        (Siglip2EncoderConfig, SIGLIP2, "Siglip2VisionModel"),
    ],
)
def test_inline_tower(cls: type, tower: dict, hf_cls: str) -> None:
    cfg = cls(tower=tower, feature_layer=-2)
    enc = build_hf_encoder(cfg)
    assert type(enc.tower).__name__ == hf_cls
    out = enc(pixels())
    assert cfg.predicted_num_tokens() == enc.num_tokens == out.shape[1] == 16
    assert cfg.predicted_feature_dim() == enc.feature_dim == out.shape[2] == 32
    assert len(enc.tower.encoder.layers) == 2
    assert out.dtype == torch.float32
    # every remaining parameter takes part in the forward
    out.float().sum().backward()
    unused = [n for n, p in enc.named_parameters() if p.grad is None]
    assert unused == []


def test_inline_tower_unknown_key() -> None:
    with pytest.raises(ValueError, match="hiden_size"):
        build_hf_encoder(SiglipEncoderConfig(tower={**VISION, "hiden_size": 8}))


@pytest.mark.parametrize(
    ("key", "cls"),
    [
        ("siglip", SiglipEncoderConfig),
        ("clip_dual", ClipEncoderConfig),
        ("siglip2", Siglip2EncoderConfig),
    ],
)
def test_from_config_is_random_init_of_same_shape(saved: dict, key: str, cls: type) -> None:
    folder, _ = saved[key]
    loaded = build_hf_encoder(cls(path=str(folder)))
    torch.manual_seed(1234)
    fresh = build_hf_encoder(cls(path=str(folder), from_config=True))
    a, b = loaded.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert any("weight" in k and "norm" not in k for k in differing)
    assert fresh.num_tokens == loaded.num_tokens and fresh.feature_dim == loaded.feature_dim


def test_dtype_bfloat16(saved: dict) -> None:
    folder, ref = saved["siglip"]
    enc = build_hf_encoder(SiglipEncoderConfig(path=str(folder), dtype="bfloat16"))
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    x = pixels()
    out = enc(x)  # float32 pixels are cast to the tower's dtype
    assert out.dtype == torch.bfloat16
    want = ref_hidden(ref, x).hidden_states[-1]
    torch.testing.assert_close(out.float(), want, rtol=0.1, atol=0.1)
    tower = build_hf_encoder(SiglipEncoderConfig(tower=VISION, dtype="bfloat16"))
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}


def test_default_dtype_is_as_saved(tmp_path: Path) -> None:
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).to(
        torch.bfloat16
    )
    model.save_pretrained(tmp_path / "bf16")
    enc = build_hf_encoder(SiglipEncoderConfig(path=str(tmp_path / "bf16")))
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    enc32 = build_hf_encoder(SiglipEncoderConfig(path=str(tmp_path / "bf16"), dtype="float32"))
    assert {p.dtype for p in enc32.parameters()} == {torch.float32}


# ---------------------------------------------------------------- errors


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_hf_encoder(SiglipEncoderConfig(path=str(tmp_path / "absent")))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        build_hf_encoder(ClipEncoderConfig(path=str(tmp_path)))


def test_folder_without_vision_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"does not hold a siglip vision model.*'llama'"):
        build_hf_encoder(SiglipEncoderConfig(path=str(tmp_path)))


def test_folder_of_another_family(saved: dict) -> None:
    with pytest.raises(ValueError, match=r"holds a clip model.*use type = 'clip'"):
        build_hf_encoder(SiglipEncoderConfig(path=str(saved["clip_dual"][0])))
    with pytest.raises(ValueError, match="holds a siglip model"):
        build_hf_encoder(Siglip2EncoderConfig(path=str(saved["siglip"][0])))


def test_folder_without_weights(saved: dict, tmp_path: Path) -> None:
    shutil.copy(saved["siglip"][0] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="cannot load weights"):
        build_hf_encoder(SiglipEncoderConfig(path=str(tmp_path)))
    # from_config needs no weights
    assert (
        build_hf_encoder(SiglipEncoderConfig(path=str(tmp_path), from_config=True)).num_tokens == 16
    )


def test_weights_of_something_else(saved: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    shutil.copy(saved["siglip"][0] / "config.json", tmp_path / "config.json")
    save_file({"unrelated.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks .* weights of the siglip vision tower"):
        build_hf_encoder(SiglipEncoderConfig(path=str(tmp_path)))


def test_feature_layer_out_of_range_at_build(saved: dict) -> None:
    with pytest.raises(
        ValueError, match="feature_layer=-5 is out of range for a tower of 3 layers"
    ):
        build_hf_encoder(SiglipEncoderConfig(path=str(saved["siglip"][0]), feature_layer=-5))
    with pytest.raises(ValidationError, match="feature_layer"):
        SiglipEncoderConfig(tower=VISION, feature_layer=4)


def test_processor_size_mismatch(saved: dict, tmp_path: Path) -> None:
    folder = tmp_path / "mismatch"
    shutil.copytree(saved["siglip"][0], folder)
    transformers.SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    with pytest.raises(ValueError, match="produces 64x64 images but the siglip tower takes 32x32"):
        build_hf_encoder(SiglipEncoderConfig(path=str(folder)))


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 3, 64, 64), r"expects pixel_values of shape \(B, 3, 32, 32\), got \(2, 3, 64, 64\)"),
        ((2, 4, 32, 32), r"\(B, 3, 32, 32\)"),
        ((3, 32, 32), r"\(B, 3, 32, 32\)"),
    ],
)
def test_wrong_input_shape(saved: dict, shape: tuple[int, ...], match: str) -> None:
    enc = build_hf_encoder(ClipEncoderConfig(path=str(saved["clip"][0])))
    with pytest.raises(ValueError, match=match):
        enc(torch.zeros(shape))


def test_transformers_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'vlm-encoders\[hf\]'"):
        build_hf_encoder(SiglipEncoderConfig(tower=VISION))


def test_transformers_logging_restored() -> None:
    logging = transformers.utils.logging
    before = logging.get_verbosity()
    try:
        for level in (logging.INFO, logging.WARNING):
            logging.set_verbosity(level)
            build_hf_encoder(SiglipEncoderConfig(tower=VISION))
            assert logging.get_verbosity() == level
    finally:
        logging.set_verbosity(before)
