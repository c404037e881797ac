"""The prefix layout survives the interleaved-images work bit for bit.

``data/`` holds tiny checkpoints and reference outputs written by the code *before*
interleaved images existed (see ``data/make_prefix_reference.py``); a model built by the
current code, loaded from those weights, must reproduce every output with
``torch.equal``: logits of ``model(pixels, ids)``, the fused ``loss``, clips with a
padded frame, and greedy left-padded generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm_config import JobConfig
from vlm_strategies import build_vlm

DATA = Path(__file__).parent / "data"
TAGS = sorted(p.stem for p in DATA.glob("*.json"))


def test_reference_data_is_complete_and_small() -> None:
    assert TAGS == [
        "cross_attention",
        "cross_attention_clip",
        "joint_decoder",
        "joint_decoder_clip",
        "moma",
        "mot",
        "mot_clip",
    ]
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 200_000


@pytest.mark.parametrize("tag", TAGS)
def test_prefix_layout_outputs_are_bit_identical(tag: str) -> None:
    job = JobConfig.model_validate(json.loads((DATA / f"{tag}.json").read_text()))
    model = build_vlm(job)
    missing, unexpected = model.load_state_dict(load_file(DATA / f"{tag}.safetensors"))
    assert not missing and not unexpected
    model.eval()
    ref = load_file(DATA / f"{tag}_ref.safetensors")
    pixels, ids, mask = ref["pixels"], ref["ids"], ref.get("frame_mask")
    with torch.no_grad():
        logits, _ = model(pixels, ids, frame_mask=mask)
        loss = model.loss(pixels, ids, ids, mask)
        tokens = model.generate(
            pixels, ids, frame_mask=mask, max_new_tokens=4, attention_mask=ref["attention_mask"]
        )
    assert torch.equal(logits, ref["logits"]), (logits - ref["logits"]).abs().max()
    assert torch.equal(loss.reshape(1), ref["loss"])
    assert torch.equal(tokens, ref["generated"])
