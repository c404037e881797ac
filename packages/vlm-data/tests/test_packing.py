"""PackingCollator: exact layout on hand-made samples, bin packing, determinism."""

from __future__ import annotations

import pytest
import torch

from vlm_data import (
    IGNORE_INDEX,
    PAD_SEQUENCE_ID,
    CaptionTooLongError,
    DataError,
    GlobalBatchSampler,
    ImageTextCollator,
    PackingCollator,
    Sample,
    TextTokenizer,
    first_fit_decreasing,
)

X = IGNORE_INDEX


@pytest.fixture
def tok() -> TextTokenizer:
    return TextTokenizer.train(["one two three four five", "what"])


def _image(value: float) -> torch.Tensor:
    return torch.full((3, 2, 2), value)


def test_first_fit_decreasing() -> None:
    # longest first: 5 -> bin0, 4 -> bin1, 3 -> bin2 (bins 0, 1 too full), 2 -> bin1
    # (first fit, not best fit), 1 -> bin0; items listed by index inside a bin
    assert first_fit_decreasing([3, 5, 1, 4, 2], 6) == [[1, 2], [3, 4], [0]]
    assert first_fit_decreasing([2, 2, 2], 6) == [[0, 1, 2]]
    assert first_fit_decreasing([], 4) == []
    with pytest.raises(DataError, match="sample 1 of the micro-batch takes 7 positions"):
        first_fit_decreasing([1, 7], 6)


def test_packed_layout_exact(tok: TextTokenizer) -> None:
    bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
    one, two, three, what = (tok.encode(w)[0] for w in ("one", "two", "three", "what"))
    base = ImageTextCollator(tok, 6)
    pack = PackingCollator(base, row_length=10, placeholders_per_image=2, image_token_id=99)
    samples: list[Sample] = [
        {"pixel_values": _image(0.0), "caption": "one two", "prompt": "what"},  # 2+5 = 7
        {"caption": "three"},  # text-only: 3
        {"pixel_values": _image(2.0), "caption": "one"},  # 2+3 = 5
        {"pixel_values": _image(3.0), "caption": "two"},  # 5
    ]
    assert pack.sample_lengths(samples) == [7, 3, 5, 5]
    out = pack(samples)
    # FFD: 7 -> row0 (3 left), 5 -> row1 (5 left), 5 -> row1 (0 left), 3 -> row0
    assert out["input_ids"].tolist() == [
        [99, 99, bos, what, one, two, eos, bos, three, eos],
        [99, 99, bos, one, eos, 99, 99, bos, two, eos],
    ]
    assert out["labels"].tolist() == [
        [X, X, X, X, one, two, eos, X, three, eos],
        [X, X, X, one, eos, X, X, X, two, eos],
    ]
    assert out["sequence_ids"].tolist() == [[0] * 7 + [1] * 3, [2] * 5 + [3] * 5]
    assert out["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 0, 1, 2],
        [0, 1, 2, 3, 4, 0, 1, 2, 3, 4],
    ]
    assert out["placeholder_mask"].tolist() == [
        [True, True] + [False] * 8,
        [True, True, False, False, False, True, True, False, False, False],
    ]
    assert bool(out["attention_mask"].all()) and out["useful_tokens"] == 20
    assert out["image_token_id"] == 99
    # images in row order, then text order; the row of each image
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 2.0, 3.0]
    assert out["image_sample_index"].tolist() == [0, 1, 1]
    assert out["frame_mask"] is None
    assert out["sample_row"].tolist() == [0, 0, 1, 1]
    assert out["sample_start"].tolist() == [0, 7, 0, 5]
    assert out["sample_length"].tolist() == [7, 3, 5, 5]
    assert out["captions"] == ["one two", "three", "one", "two"]

    # a row that is not full: right padding with its own sequence id, outside the loss
    short = pack(samples[1:3])  # 5 + 3 = 8 positions in one row, trimmed to 8
    assert short["input_ids"].tolist() == [[bos, three, eos, 99, 99, bos, one, eos]]
    wide = PackingCollator(base, row_length=10, placeholders_per_image=2)
    two_rows = wide([samples[0], samples[2], samples[2]])  # 7 | 5 + 5
    assert two_rows["input_ids"][0, 7:].tolist() == [pad] * 3
    assert two_rows["labels"][0, 7:].tolist() == [X] * 3
    assert two_rows["sequence_ids"][0].tolist() == [0] * 7 + [PAD_SEQUENCE_ID] * 3
    assert two_rows["position_ids"][0, 7:].tolist() == [0] * 3
    assert two_rows["attention_mask"][0].tolist() == [True] * 7 + [False] * 3
    assert two_rows["useful_tokens"] == 17


def test_no_sample_predicts_the_next_samples_first_token(tok: TextTokenizer) -> None:
    """Even a sample whose first label is a real token (here: placeholders and BOS are
    unlabelled anyway, so force it through a collator without BOS masking) gets -100
    on its first position: the previous sample's last position trains on nothing."""

    class Unmasked(ImageTextCollator):
        def encode(self, prompt: str, caption: str) -> tuple[list[int], list[int]]:
            ids = [*self.tokenizer.encode(caption), self.tokenizer.eos_id]
            return ids, list(ids)

    pack = PackingCollator(Unmasked(tok, 6), row_length=8, placeholders_per_image=1)
    out = pack([{"caption": "one two"}, {"caption": "three"}])
    labels, seq = out["labels"][0], out["sequence_ids"][0]
    starts = [0] + [p for p in range(1, len(seq)) if seq[p] != seq[p - 1]]
    assert starts == [0, 3]
    assert all(int(labels[p]) == X for p in starts)
    assert labels.tolist() == [X, tok.encode("two")[0], tok.eos_id, X, tok.eos_id]


def test_clips_frame_mask_and_text_only_batch(tok: TextTokenizer) -> None:
    pack = PackingCollator(
        ImageTextCollator(tok, 6, image_shape=(3, 4, 4)), row_length=32, placeholders_per_image=8
    )
    clip = torch.zeros(2, 3, 4, 4)
    out = pack(
        [
            {"pixel_values": clip, "frame_mask": torch.tensor([True, False]), "caption": "one"},
            {"pixel_values": clip + 1, "caption": "two"},  # no mask: every frame real
        ]
    )
    assert out["pixel_values"].shape == (2, 2, 3, 4, 4)
    assert out["frame_mask"] is not None
    assert out["frame_mask"].tolist() == [[True, False], [True, True]]
    text = pack([{"caption": "one"}, {"caption": "two three"}])
    assert text["pixel_values"].shape == (0, 3, 4, 4)
    assert text["image_sample_index"].shape == (0,)
    assert not bool(text["placeholder_mask"].any())


def test_errors(tok: TextTokenizer) -> None:
    pack = PackingCollator(ImageTextCollator(tok, 4), row_length=6, placeholders_per_image=4)
    with pytest.raises(DataError, match="takes 8 positions; a packed row holds 6"):
        pack([{"pixel_values": _image(0), "caption": "one two"}])
    with pytest.raises(CaptionTooLongError):
        pack([{"caption": "one two three four"}])
    with pytest.raises(DataError, match="empty batch"):
        pack([])
    with pytest.raises(DataError, match="different pixel shapes"):
        PackingCollator(ImageTextCollator(tok, 4), row_length=20, placeholders_per_image=1)(
            [
                {"pixel_values": _image(0), "caption": "one"},
                {"pixel_values": torch.zeros(3, 4, 4), "caption": "two"},
            ]
        )
    with pytest.raises(ValueError, match="row_length"):
        PackingCollator(ImageTextCollator(tok, 4), row_length=0, placeholders_per_image=1)


def test_packing_is_a_pure_function_of_the_step(tok: TextTokenizer) -> None:
    """Resume determinism: the packed micro-batch of a step depends only on the step's
    samples (from the step-indexed sampler), not on what was packed before."""
    words = ["one", "two", "three", "four", "five"]
    dataset: list[Sample] = [
        {"pixel_values": _image(float(i)), "caption": " ".join(words[: 1 + i % 5])}
        if i % 3
        else {"caption": " ".join(words[: 1 + i % 4])}
        for i in range(40)
    ]
    sampler = GlobalBatchSampler(len(dataset), 8, seed=3)
    pack = PackingCollator(ImageTextCollator(tok, 8), row_length=16, placeholders_per_image=3)

    def step(s: int) -> dict:
        return pack([dataset[i] for i in sampler.global_batch(s)])  # type: ignore[return-value]

    straight = [step(s) for s in range(6)]
    resumed = [step(s) for s in range(3, 6)]  # a fresh run from step 3
    for a, b in zip(straight[3:], resumed):
        for key in ("input_ids", "labels", "sequence_ids", "position_ids", "pixel_values"):
            assert torch.equal(a[key], b[key]), key
    # packing actually packed: fewer rows than samples, every sample kept exactly once
    for out in straight:
        assert out["input_ids"].shape[0] < 8
        seq = out["sequence_ids"]
        assert sorted(set(seq[seq >= 0].tolist())) == list(range(8))
