"""Image decoding: modes a plain convert("RGB") gets wrong, and files that must be refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_data import DataError, load_image, to_rgb


def test_16_bit_png_keeps_its_contrast(tmp_path: Path) -> None:
    # a 12-bit scan stored in a 16-bit PNG: values 1000..3000, far above 255
    arr = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255  # scaled by its range, not clipped
    assert len(np.unique(out[..., 0])) > 200  # gradations survive


def test_palette_with_transparency_and_cmyk_become_correct_rgb(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0  # index 0 (red) transparent -> black
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    rgb = np.asarray(load_image(path))
    assert tuple(rgb[0, 0]) == (0, 0, 255) and tuple(rgb[1, 1]) == (0, 0, 0)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    r, g, b = np.asarray(load_image(path))[2, 2].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_to_rgb_constant_high_depth_and_float() -> None:
    flat = Image.fromarray(np.full((3, 3), 500, dtype=np.uint16))
    assert np.asarray(to_rgb(flat)).max() == 0
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(f))[1, 0].tolist() == [255, 255, 255]


def test_bomb_truncated_and_junk_are_refused_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = Image.new("L", (64, 64), 128)
    path = tmp_path / "big.png"
    image.save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # refuses above 2000 pixels
    with pytest.raises(DataError) as info:
        load_image(path, record="m.jsonl:3")
    message = str(info.value)
    assert message.startswith(f"cannot read image {path} (m.jsonl:3): too large to decode safely")
    assert "MAX_IMAGE_PIXELS = 1000" in message
    monkeypatch.undo()
    cut = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"cannot read image {cut}: the file is truncated"):
        load_image(cut)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot read image {junk}: cannot identify"):
        load_image(junk)
