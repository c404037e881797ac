"""The input pipeline: DataLoader workers, resume, bad samples, text-only samples,
webdataset streaming."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_data import (
    DIGIT_WORDS,
    DataError,
    DatasetContext,
    DigitsCaptionDataset,
    GlobalBatchSampler,
    HFDatasetConfig,
    ImageTextCollator,
    JsonlDataset,
    TextTokenizer,
    WebDatasetConfig,
    build_datasets,
    digit_images,
    raise_batch_error,
    train_loader,
)


def fake_preprocess(images: list) -> torch.Tensor:
    out = []
    for im in images:
        arr = np.asarray(im.convert("RGB").resize((16, 16)), dtype=np.float32) / 127.5 - 1
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train([*DIGIT_WORDS, "what digit is it"])


def _manifest(tmp_path: Path, rows: list[dict[str, Any]], name: str = "m.jsonl") -> Path:
    images, _ = digit_images(np.arange(8))
    for i, im in enumerate(images):
        im.save(tmp_path / f"d{i}.png")
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _loader(dataset: Any, tok: TextTokenizer, *, workers: int, start: int = 0, **kw: Any) -> Any:
    sampler = GlobalBatchSampler(len(dataset), 4, seed=0)
    return train_loader(
        dataset,
        ImageTextCollator(tok, 8),
        sampler,
        num_micro=1,
        micro_batch=4,
        rank=kw.pop("rank", 0),
        world_size=kw.pop("world_size", 1),
        start_step=start,
        end_step=6,
        seed=0,
        num_workers=workers,
        prefetch_factor=2,
        on_bad_sample=kw.pop("on_bad_sample", "error"),
        pin_memory=False,
    )


def test_workers_and_resume_give_the_same_augmented_batches(tok: TextTokenizer) -> None:
    ds = DigitsCaptionDataset("train", fake_preprocess, augment_shift=1)
    serial = list(_loader(ds, tok, workers=0))
    parallel = list(_loader(ds, tok, workers=2))
    assert len(serial) == len(parallel) == 6
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["input_ids"], b["input_ids"])
    resumed = list(_loader(ds, tok, workers=2, start=3))
    assert len(resumed) == 3
    for a, b in zip(serial[3:], resumed, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    # the shift is on (pixels differ from the stored, unaugmented ones)
    index = GlobalBatchSampler(len(ds), 4, seed=0).global_batch(0)
    plain = torch.stack([ds[i]["pixel_values"] for i in index])
    assert not torch.equal(plain, serial[0]["pixel_values"])
    # ranks split each micro-batch; together they see the 1-process batch
    r0 = next(iter(_loader(ds, tok, workers=0, rank=0, world_size=2)))
    r1 = next(iter(_loader(ds, tok, workers=0, rank=1, world_size=2)))
    assert torch.equal(serial[0]["pixel_values"][0::2], r0["pixel_values"])
    assert torch.equal(serial[0]["pixel_values"][1::2], r1["pixel_values"])


def test_bad_sample_error_names_file_and_record(tmp_path: Path, tok: TextTokenizer) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows = [{"image": f"d{i}.png", "caption": "one"} for i in range(3)]
    rows.insert(1, {"image": "bad.png", "caption": "two"})
    path = _manifest(tmp_path, rows)
    ds = JsonlDataset(path, fake_preprocess)
    with pytest.raises(DataError) as info:
        for batch in _loader(ds, tok, workers=2):
            raise_batch_error(batch)
    message = str(info.value)
    assert f"{tmp_path / 'bad.png'} ({path}:2)" in message and "cannot read image" in message
    assert "Traceback" not in message


def test_bad_sample_skip_counts_and_continues(tmp_path: Path, tok: TextTokenizer) -> None:
    (tmp_path / "bad.png").write_bytes(b"junk")
    rows = [{"image": f"d{i}.png", "caption": "one"} for i in range(5)]
    rows[2] = {"image": "bad.png", "caption": "two"}
    rows[3] = {"image": "missing.png", "caption": "two"}
    ds = JsonlDataset(_manifest(tmp_path, rows), fake_preprocess)
    batches = list(_loader(ds, tok, workers=1, on_bad_sample="skip"))
    assert len(batches) == 6 and all(b["pixel_values"].shape[0] == 4 for b in batches)
    skipped = [m for b in batches for m in b["skipped"]]
    # 6 steps x 4 = 24 draws of 5 samples: each bad one drawn 4-5 times
    assert len(skipped) >= 8
    assert any("image file not found" in m and "m.jsonl:4" in m for m in skipped)
    assert any("cannot read image" in m and "m.jsonl:3" in m for m in skipped)
    assert all(c == "one" for b in batches for c in b["captions"])  # replaced by good ones


def test_manifest_errors_name_line_and_allowed(tmp_path: Path) -> None:
    for line, expected in [
        ('{"image": 3, "caption": "x"}', "'image' must be a file path string"),
        ('{"image": "a.png"}', "needs a 'caption' string"),
        ('{"images": [], "caption": "x"}', "'images' must be a non-empty list"),
        ("[1, 2]", "a record must be a JSON object"),
    ]:
        path = tmp_path / "m.jsonl"
        path.write_text('{"caption": "ok"}\n' + line + "\n")
        with pytest.raises(DataError, match=f"{path}:2: .*{expected}"):
            JsonlDataset(path, fake_preprocess)


def test_text_only_samples_collate_with_an_image_mask(tmp_path: Path, tok: TextTokenizer) -> None:
    rows = [
        {"image": "d0.png", "caption": "zero"},
        {"caption": "one two"},
        {"image": "d1.png", "caption": "one", "prompt": "what digit"},
    ]
    ds = JsonlDataset(_manifest(tmp_path, rows), fake_preprocess)
    assert "pixel_values" not in ds[1] and ds[1]["meta"]["num_frames"] == 0
    batch = ImageTextCollator(tok, 8)([ds[0], ds[1], ds[2]])
    assert batch["image_mask"].tolist() == [True, False, True]
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["pixel_values"][1].eq(0).all()
    assert torch.equal(batch["pixel_values"][2], ds[2]["pixel_values"])
    only_text = ImageTextCollator(tok, 8, image_shape=(3, 16, 16))([ds[1]])
    assert only_text["pixel_values"].shape == (1, 3, 16, 16)
    assert only_text["image_mask"].tolist() == [False]


def _shard(path: Path, items: list[tuple[str, Image.Image | None, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in items:
            members = [("txt", caption.encode())]
            if image is not None:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                members.insert(0, ("png", buf.getvalue()))
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_streams_split_by_rank_and_worker(tmp_path: Path, tok: TextTokenizer) -> None:
    images, labels = digit_images(np.arange(24))
    for s in range(4):
        items = [
            (f"{s:02d}{i:04d}", images[s * 6 + i], DIGIT_WORDS[int(labels[s * 6 + i])])
            for i in range(6)
        ]
        _shard(tmp_path / f"shard-{s}.tar", items)
    config = WebDatasetConfig(
        train_shards=[str(tmp_path / "shard-*.tar")], test_shards=[str(tmp_path / "shard-3.tar")]
    )
    sets = build_datasets(config, DatasetContext(preprocess=fake_preprocess))
    train, test = sets["train"], sets["test"]
    assert len(test) == 6 and test[2]["caption"] == DIGIT_WORDS[int(labels[20])]
    seen: list[list[str]] = []
    for rank in range(2):
        loader = train_loader(
            train,
            ImageTextCollator(tok, 8),
            None,
            num_micro=1,
            micro_batch=3,
            rank=rank,
            world_size=2,
            start_step=0,
            end_step=4,
            seed=0,
            num_workers=2,
            prefetch_factor=2,
            on_bad_sample="error",
            pin_memory=False,
        )
        it = iter(loader)
        keys = [m["record"].rsplit(":", 1)[1] for _ in range(8) for m in next(it)["meta"]]
        seen.append(keys)
        del it
    epoch0 = seen[0][:12] + seen[1][:12]  # 4 streams x 6 samples: one epoch
    assert sorted(epoch0) == sorted(f"{s:02d}{i:04d}" for s in range(4) for i in range(6))
    # a resume at step 2 continues the same stream without decoding the skipped records
    resumed = train_loader(
        train,
        ImageTextCollator(tok, 8),
        None,
        num_micro=1,
        micro_batch=3,
        rank=0,
        world_size=2,
        start_step=2,
        end_step=4,
        seed=0,
        num_workers=2,
        prefetch_factor=2,
        on_bad_sample="error",
        pin_memory=False,
    )
    it = iter(resumed)
    again = [m["record"].rsplit(":", 1)[1] for _ in range(2) for m in next(it)["meta"]]
    assert again == seen[0][6:12]


def test_webdataset_missing_caption_is_named(tmp_path: Path) -> None:
    images, _ = digit_images(np.arange(1))
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        buf = io.BytesIO()
        images[0].save(buf, format="PNG")
        info = tarfile.TarInfo("k1.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    config = WebDatasetConfig(train_shards=[str(path)])
    train = build_datasets(config, DatasetContext(preprocess=fake_preprocess))["train"]
    with pytest.raises(DataError, match=f"{path}:k1: no .txt member"):
        next(iter(train))


def test_hf_dataset_from_a_saved_folder_with_column_mapping(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    images, labels = digit_images(np.arange(6))
    table = {"picture": images, "label_text": [DIGIT_WORDS[int(y)] for y in labels]}
    split = datasets.Dataset.from_dict(table).cast_column("picture", datasets.Image())
    datasets.DatasetDict({"train": split, "test": split.select(range(2))}).save_to_disk(
        str(tmp_path / "saved")
    )
    config = HFDatasetConfig(
        path=str(tmp_path / "saved"),
        image_column="picture",
        text_column="label_text",
        prompt="what digit",
    )
    sets = build_datasets(config, DatasetContext(preprocess=fake_preprocess))
    assert len(sets["train"]) == 6 and len(sets["test"]) == 2
    item = sets["train"][3]
    assert item["caption"] == DIGIT_WORDS[int(labels[3])] and item["prompt"] == "what digit"
    assert item["pixel_values"].shape == (3, 16, 16)
    bad = HFDatasetConfig(path=str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"no column\(s\) \['image', 'text'\].*data.image_column"):
        build_datasets(bad, DatasetContext(preprocess=fake_preprocess))
