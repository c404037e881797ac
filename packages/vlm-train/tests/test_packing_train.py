"""Packing end to end: packed rows give every sample the loss it has unpacked (the four
archs), and the Trainer trains and resumes on packed rows like on padded ones."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_job

from vlm_config import JobConfig
from vlm_data import IGNORE_INDEX, ImageTextCollator, PackingCollator, Sample, TextTokenizer
from vlm_strategies import MediaBatch, build_vlm, placeholders_per_image
from vlm_strategies.wrapper import shift_labels
from vlm_train import Trainer

ARCHS = ["joint_decoder", "cross_attention", "mot", "moma"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def _model(arch: str) -> Any:
    job = JobConfig.model_validate(
        {
            "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 32, "max_seq_len": 32},
            "encoder": {"type": "random", "num_tokens": 4, "feature_dim": 16, "image_size": 16},
            "adapter": {"type": "mlp_2layer"},
            "arch": {"arch": arch, "max_text_len": 10},
        }
    )
    torch.manual_seed(0)
    return build_vlm(job).eval()


def _samples() -> list[Sample]:
    """Captions of 1..7 words, every third sample text-only."""
    gen = torch.Generator().manual_seed(1)
    out: list[Sample] = []
    for i in range(7):
        caption = " ".join(WORDS[(i + j) % 8] for j in range(1 + (i * 3) % 7))
        sample: Sample = {"caption": caption, "prompt": "what" if i % 2 else ""}
        if i % 3 != 1:
            sample["pixel_values"] = torch.randn(3, 16, 16, generator=gen)
        out.append(sample)
    return out


def _alone(model: Any, pack: PackingCollator, sample: Sample) -> tuple[MediaBatch, int]:
    """One sample as its own unpadded row (the unpacked layout)."""
    e = pack.encode(sample)
    has = "pixel_values" in sample
    batch = MediaBatch(
        input_ids=torch.tensor([e.ids]),
        image_token_id=pack.image_token_id,
        pixel_values=sample["pixel_values"][None] if has else torch.zeros(0, 3, 16, 16),
        image_sample_index=torch.zeros(1 if has else 0, dtype=torch.long),
        labels=torch.tensor([e.labels]),
        placeholder_mask=torch.tensor([[p < e.placeholders for p in range(len(e.ids))]]),
    )
    return batch, int((shift_labels(batch.labels) != IGNORE_INDEX).sum())


def _span_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_loss_equals_unpacked_per_sample(arch: str) -> None:
    """Per sample and per micro-batch (the mean over the same non-ignored tokens), the
    packed loss equals the unpacked one within 1e-5 for every arch: each sample run
    alone, and the Trainer's unpacked ``MediaBatch`` (padded rows, attention mask).

    Pinned differences against the Trainer's *prefix* layout (used when every row of a
    micro-batch has an image): MoMa routes the text padding after EOS there (it counts
    as real positions in expert choice), cross-attention has no placeholder token there
    (its text starts one position earlier); the joint decoder and MoT match it too."""
    model = _model(arch)
    tok = TextTokenizer.train([*WORDS, "what"])
    base = ImageTextCollator(tok, 10)
    k = placeholders_per_image(model.num_image_positions)
    pack = PackingCollator(base, row_length=40, placeholders_per_image=k)
    samples = _samples()
    packed = pack(samples)
    assert packed["input_ids"].shape[0] < len(samples)  # rows really hold several samples
    batch = Trainer._packed_batch(packed, torch.device("cpu"))
    with torch.no_grad():
        logits, labels = model(batch)
        targets = shift_labels(labels)
        total, count = 0.0, 0
        for i, sample in enumerate(samples):
            row = int(packed["sample_row"][i])
            lo = int(packed["sample_start"][i])
            hi = lo + int(packed["sample_length"][i])
            got = _span_loss(logits[row, lo:hi], targets[row, lo:hi])
            alone, n = _alone(model, pack, sample)
            want = model.loss(alone)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"sample {i}")
            total, count = total + float(want) * n, count + n
        packed_loss = model.loss(batch)
        packed_aux = model.auxiliary_losses()
        assert float(packed_loss) == pytest.approx(total / count, abs=1e-5)

        # the Trainer's unpacked path for this micro-batch (text-only rows: padded rows
        # as a MediaBatch with an attention mask): the same loss
        padded = base(samples)
        trainer = SimpleNamespace(model=model, tokenizer=tok)
        cpu = torch.device("cpu")
        unpacked = Trainer._media_batch(trainer, padded, padded["image_mask"], cpu)  # type: ignore[arg-type]
        torch.testing.assert_close(packed_loss, model.loss(unpacked), atol=1e-5, rtol=0)
        if arch == "moma":
            # router aux losses are means over every real position of the micro-batch:
            # the same positions packed or padded, so they agree too
            unpacked_aux = model.auxiliary_losses()
            assert packed_aux.keys() == unpacked_aux.keys() and packed_aux
            for name, value in packed_aux.items():
                torch.testing.assert_close(value, unpacked_aux[name], atol=1e-5, rtol=0)

        # the Trainer's prefix layout (every row has an image): the same loss for the
        # joint decoder and MoT; pinned differences for cross-attention (its MediaBatch
        # marks the image with one placeholder token, so the text sits one position
        # later) and MoMa (the prefix layout routes the text padding)
        imaged = [s for s in samples if "pixel_values" in s]
        rows = base(imaged)
        prefix = float(model.loss(rows["pixel_values"], rows["input_ids"], rows["labels"], None))
        packed_imaged = float(model.loss(Trainer._packed_batch(pack(imaged), torch.device("cpu"))))
        if arch in ("cross_attention", "moma"):
            assert abs(prefix - packed_imaged) > 1e-4
        else:
            assert prefix == pytest.approx(packed_imaged, abs=1e-5)


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("kind") == "train"]


def test_trainer_packed_matches_padded_and_resumes_exactly(tmp_path: Path) -> None:
    """The same steps packed and padded: equal losses (same samples, same per-token
    mean); a packed run stopped at step 2 and resumed equals the straight run."""
    common = {"eval_at_end": False, "export": False, "checkpoint_every": 2, "steps": 4}
    data = {"num_workers": 0, "packing": True, "packed_length": 32}

    def run(out: Path, stop: int | None = None, **data_over: Any) -> Any:
        job = tiny_job(out, train=common, data={**data, **data_over})
        with Trainer(job, log=lambda _m: None) as trainer:
            if data_over.get("packing", True):
                batch = trainer.next_batches()[0]
                assert batch["input_ids"].shape[0] < job.train.batch_size  # packed rows
                trainer._batches = None  # re-read step 0 from the loader
            return trainer.run(stop_after_steps=stop)

    run(tmp_path / "padded", packing=False)
    run(tmp_path / "packed")
    padded, packed = _losses(tmp_path / "padded"), _losses(tmp_path / "packed")
    assert len(padded) == len(packed) == 4
    assert packed == pytest.approx(padded, abs=1e-5)

    first = run(tmp_path / "resumed", stop=2)
    assert first.step == 2
    second = run(tmp_path / "resumed")
    assert second.resumed_from == 2 and second.step == 4
    assert _losses(tmp_path / "resumed") == pytest.approx(packed, abs=1e-7)
