from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlm_data import (
    DIGIT_WORDS,
    IGNORE_INDEX,
    CaptionTooLongError,
    DataError,
    DigitsCaptionDataset,
    DigitsVideoDataset,
    FilesDataset,
    GlobalBatchSampler,
    ImageTextCollator,
    TextTokenizer,
    digit_images,
    digits_split,
    load_image,
    random_shift,
)


def fake_preprocess(images: list) -> torch.Tensor:
    """PIL -> (B, 3, 16, 16) without an encoder (nearest upscale, [-1, 1])."""
    out = []
    for im in images:
        arr = np.asarray(im.convert("RGB").resize((16, 16)), dtype=np.float32) / 127.5 - 1
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train([*DIGIT_WORDS, "what digit is it"])


def test_collator_masks(tok: TextTokenizer) -> None:
    col = ImageTextCollator(tok, max_text_len=10)
    px = torch.zeros(3, 16, 16)
    batch = col(
        [
            {"pixel_values": px, "prompt": "what digit", "caption": "seven"},
            {"pixel_values": px, "prompt": "", "caption": "one two three"},
        ]
    )
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (2, 10)
    seven, eos, bos = tok.encode("seven")[0], tok.eos_id, tok.bos_id
    # row 0: BOS what digit seven EOS PAD...
    assert ids[0, :5].tolist() == [bos, *tok.encode("what digit"), seven, eos]
    assert labels[0].tolist() == [IGNORE_INDEX] * 3 + [seven, eos] + [IGNORE_INDEX] * 5
    assert ids[0, 5:].eq(tok.pad_id).all() and mask[0].tolist() == [True] * 5 + [False] * 5
    # row 1: no prompt: only BOS masked
    assert labels[1, 0] == IGNORE_INDEX
    assert labels[1, 1:5].tolist() == [*tok.encode("one two three"), eos]
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["frame_mask"] is None
    # where labels are kept they equal the inputs (causal_lm_loss shifts them)
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], ids[keep])


def test_collator_too_long_and_prompt_batch(tok: TextTokenizer) -> None:
    col = ImageTextCollator(tok, max_text_len=4)
    with pytest.raises(CaptionTooLongError, match="max_text_len is 4"):
        col.encode("", "one two three")
    ids, mask = col.prompt_batch(["what digit", ""])
    assert ids.shape == (2, 3)
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert ids[1, 2] == tok.bos_id


def test_digits_split_deterministic_and_stratified() -> None:
    a, b = digits_split(0.2, seed=0), digits_split(0.2, seed=0)
    assert np.array_equal(a["train"], b["train"]) and np.array_equal(a["test"], b["test"])
    assert len(a["train"]) + len(a["test"]) == 1797 and len(a["test"]) == 360
    assert not set(a["train"]) & set(a["test"])
    assert not np.array_equal(digits_split(0.2, seed=1)["test"], a["test"])
    _, labels = digit_images(a["test"])
    assert np.bincount(labels).min() >= 35  # every digit held out


def test_digits_dataset_items() -> None:
    ds = DigitsCaptionDataset("test", fake_preprocess)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert item["caption"] == DIGIT_WORDS[int(ds.labels[0])]
    assert ds.captions()[:3] == [ds[i]["caption"] for i in range(3)]


def test_video_padding_and_frame_mask() -> None:
    images = DigitsCaptionDataset("train", fake_preprocess)
    ds = DigitsVideoDataset(
        "train", fake_preprocess, num_clips=50, frames_per_clip=4, images=images
    )
    again = DigitsVideoDataset(
        "train", fake_preprocess, num_clips=50, frames_per_clip=4, images=images
    )
    lengths = set()
    for i in range(len(ds)):
        item = ds[i]
        n = item["meta"]["num_frames"]
        lengths.add(n)
        assert item["pixel_values"].shape == (4, 3, 16, 16)
        assert item["frame_mask"].tolist() == [True] * n + [False] * (4 - n)
        assert item["pixel_values"][n:].eq(0).all()
        assert item["caption"] == " ".join(DIGIT_WORDS[d] for d in item["meta"]["digits"])
        assert len(item["caption"].split()) == n
        assert torch.equal(item["pixel_values"], again[i]["pixel_values"])
    assert lengths == {1, 2, 3, 4}
    first = ds[0]["meta"]["digits"]
    assert torch.equal(ds[0]["pixel_values"][0], images.pixels[ds.clips[0][0]])
    assert first == [int(images.labels[j]) for j in ds.clips[0]]
    tok = TextTokenizer.train(ds.captions())
    batch = ImageTextCollator(tok, 6)([ds[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 4, 3, 16, 16)
    assert batch["frame_mask"].shape == (5, 4)


def test_sampler_shards_cover_the_global_batch() -> None:
    s = GlobalBatchSampler(num_samples=10, batch_size=8, seed=3)
    assert s.global_batch(0) == GlobalBatchSampler(10, 8, seed=3).global_batch(0)
    # the stream crosses epochs: 16 positions from 10 samples -> epoch 0 then epoch 1
    assert sorted(s.global_batch(0) + s.global_batch(1)[:2]) == list(range(10))
    for step in range(3):
        whole = s.shard(step, 0, 2) + s.shard(step, 1, 2)
        assert whole == s.global_batch(step)
        r0, r1 = s.shard(step, 1, 2, rank=0, world_size=2), s.shard(step, 1, 2, 1, 2)
        assert sorted(r0 + r1) == sorted(s.shard(step, 1, 2)) and len(r0) == len(r1) == 2


def test_random_shift_moves_by_units() -> None:
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, 4, 4] = 1
    out = random_shift(x, 1, 2, -1.0, torch.Generator().manual_seed(0))
    for i in range(2):
        ys, xs = torch.nonzero(out[i, 0] == 1, as_tuple=True)
        assert len(ys) == 1 and int(ys[0]) in (2, 4, 6) and int(xs[0]) in (2, 4, 6)
    assert random_shift(x, 0, 2, -1.0, torch.Generator()) is x


def test_files_dataset_and_image_errors(tmp_path: Path) -> None:
    images, labels = digit_images(np.arange(3))
    rows = []
    for i, (im, y) in enumerate(zip(images, labels)):
        im.save(tmp_path / f"d{i}.png")
        rows.append({"image": f"d{i}.png", "caption": DIGIT_WORDS[int(y)]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = FilesDataset(tmp_path / "m.jsonl", fake_preprocess, prompt="what digit")
    assert len(ds) == 3 and ds[1]["caption"] == DIGIT_WORDS[int(labels[1])]
    assert ds[1]["pixel_values"].shape == (3, 16, 16) and ds[1]["prompt"] == "what digit"
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot read image"):
        load_image(tmp_path / "bad.png")
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(DataError, match="not valid JSON"):
        FilesDataset(tmp_path / "bad.jsonl", fake_preprocess)


def test_truncated_image_is_a_data_error(tmp_path: Path) -> None:
    images, _ = digit_images(np.arange(1))
    for suffix in ("png", "jpeg"):
        full = tmp_path / f"full.{suffix}"
        images[0].resize((64, 64)).save(full)
        cut = tmp_path / f"cut.{suffix}"
        data = full.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        assert load_image(full).size == (64, 64)
        with pytest.raises(DataError) as info:
            load_image(cut)
        assert str(info.value).startswith(f"cannot read image {cut}: the file is truncated")


def test_decompression_bomb_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    images, _ = digit_images(np.arange(1))
    path = tmp_path / "big.png"
    images[0].resize((64, 64)).save(path)  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # errors above 2000
    with pytest.raises(DataError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"cannot read image {path}: too large to decode safely")
    assert "4096 pixels" in message and "MAX_IMAGE_PIXELS = 1000" in message


def test_sampler_curriculum_short_samples_first() -> None:
    lengths = [1, 2, 3, 4] * 5
    s = GlobalBatchSampler(20, 8, seed=0, lengths=lengths, curriculum_steps=8)
    assert [s.allowed_length(k) for k in (0, 1, 2, 4, 7, 8)] == [1, 1, 2, 3, 4, None]
    assert all(lengths[i] == 1 for i in s.global_batch(0))
    assert all(lengths[i] <= 3 for i in s.global_batch(5))
    assert s.global_batch(3) == GlobalBatchSampler(
        20, 8, seed=0, lengths=lengths, curriculum_steps=8
    ).global_batch(3)
    assert s.global_batch(8) == GlobalBatchSampler(20, 8, seed=0).global_batch(8)
