"""Images anywhere: MediaBatch validation, cross-attention media masks, MoMa routing
counts that ignore padding and packing, and the loss entry point."""

from __future__ import annotations

import pytest
import torch
from strategies_helpers import tiny_job

from vlm_strategies import MediaBatch, build_vlm
from vlm_strategies.archs.moma.experts import MoMaExperts
from vlm_strategies.archs.moma.reference import loop_expert_forward
from vlm_strategies.testing import TinyVLM

PH = 63  # placeholder id (last vocabulary id of the tiny models)


def _model(arch: dict[str, object], seed: int = 0) -> torch.nn.Module:
    return TinyVLM(arch).build(seed=seed).eval()


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ validation


def test_media_batch_rejects_malformed_fields() -> None:
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, S\) long tensor"):
        MediaBatch(input_ids=ids.float(), image_token_id=PH)
    with pytest.raises(ValueError, match=r"image_sample_index \(N,\) = \(1,\) long is required"):
        MediaBatch(input_ids=ids, image_token_id=PH, pixel_values=_pixels(1))
    with pytest.raises(ValueError, match=r"values must be in \[0, 2\)"):
        MediaBatch(
            input_ids=ids,
            image_token_id=PH,
            pixel_values=_pixels(1),
            image_sample_index=torch.tensor([2]),
        )
    with pytest.raises(ValueError, match="non-decreasing"):
        MediaBatch(
            input_ids=ids,
            image_token_id=PH,
            pixel_values=_pixels(2),
            image_sample_index=torch.tensor([1, 0]),
        )
    with pytest.raises(ValueError, match=r"sequence_ids must be \(B, S\) = \(2, 5\)"):
        MediaBatch(input_ids=ids, image_token_id=PH, sequence_ids=torch.zeros(2, 4).long())


def test_placeholder_count_mismatch_names_the_row() -> None:
    model = _model({"arch": "joint_decoder"})
    ids = torch.zeros(2, 20, dtype=torch.long)
    ids[1, 2:17] = PH  # 15 placeholders, one image needs 16
    one = torch.tensor([1])
    batch = MediaBatch(ids, PH, pixel_values=_pixels(1), image_sample_index=one)
    with pytest.raises(ValueError, match=r"row 1 has 15 image placeholder.*1 image\(s\) x 16"):
        model(batch)


def test_loss_of_a_media_batch_equals_the_unfused_loss() -> None:
    model = _model({"arch": "mot"})
    ids = torch.randint(0, PH, (2, 24), generator=torch.Generator().manual_seed(1))
    ids[0, 3:19] = PH
    labels = ids.masked_fill(ids == PH, -100)
    batch = MediaBatch(
        input_ids=ids,
        image_token_id=PH,
        pixel_values=_pixels(1),
        image_sample_index=torch.tensor([0]),
        labels=labels,
    )
    from vlm_strategies import causal_lm_loss

    logits, got_labels = model(batch)
    assert got_labels is labels
    torch.testing.assert_close(model.loss(batch), causal_lm_loss(logits, labels))
    with pytest.raises(TypeError, match="input_ids and frame_mask come from the batch"):
        model.loss(batch, ids)


# ------------------------------------------------------------- cross-attention


def test_cross_attention_text_before_any_image_computes_the_text_decoder_exactly() -> None:
    model = _model({"arch": "cross_attention"})
    ids = torch.randint(0, PH, (2, 12), generator=torch.Generator().manual_seed(2))
    ids[0, 5] = PH  # row 0: an image at position 5; row 1: text only
    zero = torch.tensor([0])
    batch = MediaBatch(ids, PH, pixel_values=_pixels(1), image_sample_index=zero)
    with torch.no_grad():
        logits, _ = model(batch)
        text = model.transformer(ids)
    assert torch.isfinite(logits).all()
    # positions before the image and the whole image-free row: exactly the text decoder
    assert torch.equal(logits[0, :5], text[0, :5])
    assert torch.equal(logits[1], text[1])
    assert (logits[0, 5:] - text[0, 5:]).abs().amax(dim=-1).min() > 1e-4


def test_cross_attention_position_sees_only_earlier_images() -> None:
    model = _model({"arch": "cross_attention"})
    ids = torch.randint(0, PH, (1, 12), generator=torch.Generator().manual_seed(3))
    ids[0, 2] = PH
    ids[0, 7] = PH
    pixels = _pixels(2, seed=4)
    other = pixels.clone()
    other[1] = torch.randn(3, 16, 16)
    index = torch.tensor([0, 0])
    with torch.no_grad():
        a, _ = model(MediaBatch(ids, PH, pixels, index))
        b, _ = model(MediaBatch(ids, PH, other, index))
    # changing the second image changes nothing before its placeholder (position 7)
    assert torch.equal(a[0, :7], b[0, :7])
    assert (a[0, 7:] - b[0, 7:]).abs().max() > 1e-4


# ------------------------------------------------------------------------ MoMa


def test_moma_left_padded_row_equals_the_row_alone() -> None:
    model = _model({"arch": "moma", "experts_per_modality": 2})
    gen = torch.Generator().manual_seed(5)
    pixels = torch.randn(2, 3, 16, 16, generator=gen)
    short = torch.randint(0, PH, (1, 4), generator=gen)
    long = torch.randint(0, PH, (1, 9), generator=gen)
    ids = torch.cat((torch.cat((torch.zeros(1, 5, dtype=torch.long), short), 1), long))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        batched = model.generate(pixels, ids, attention_mask=mask, max_new_tokens=4)
        alone = model.generate(pixels[:1], short, max_new_tokens=4)
        ctx = model.strategy.prepare(model, pixels, ids, None)
        from vlm_transformer.generate import _with_padding

        padded = model.transformer(ids, _with_padding(ctx, mask.bool(), 2))
        ref = model.transformer(short, model.strategy.prepare(model, pixels[:1], short, None))
    assert torch.equal(batched[0, 5:], alone[0])
    torch.testing.assert_close(padded[0, 5:], ref[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("packed", [False, True])
def test_moma_experts_route_per_row_and_per_sample_like_the_loop(packed: bool) -> None:
    torch.manual_seed(0)
    layer = MoMaExperts(16, 24, 4, 0.3)
    for group in (layer.group("image"), layer.group("text")):
        group.init_parameters(0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    b, s = 3, 13
    x = torch.randn(b, s, 16, generator=g)
    modality_ids = torch.randint(0, 2, (b, s), generator=g)
    valid = torch.rand(b, s, generator=g) > 0.2
    segments = torch.tensor([[0] * 4 + [1] * 6 + [2] * 3, [0] * 13, [5] * 7 + [6] * 6])
    seg = segments if packed else None
    out = layer(x, modality_ids, valid, (s, s), segments=seg)
    ref = loop_expert_forward(layer, x, modality_ids, valid, (s, s), segments=seg)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if packed:  # each sample alone gives the same rows
        for r, lo, hi in ((0, 0, 4), (0, 4, 10), (0, 10, 13), (2, 7, 13)):
            sl = slice(lo, hi)
            row = slice(r, r + 1)
            alone = layer(x[row, sl], modality_ids[row, sl], valid[row, sl], (s, s))
            torch.testing.assert_close(out[r : r + 1, sl], alone, atol=1e-5, rtol=1e-5)


def test_build_rejects_nothing_new_for_prefix_jobs() -> None:
    # the prefix layout still needs no MediaBatch: a plain job builds and runs
    model = build_vlm(tiny_job({"arch": "joint_decoder"}))
    logits, _ = model(_pixels(1), torch.zeros(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, 64)
