"""Held-out evaluation: teacher-forced loss and exact-match accuracy by greedy generation.

Accuracy is measured on generated text (``VLMWrapper.generate``, greedy, batched), never
on teacher-forced argmax: with non-causal routing (MoMa's expert choice) teacher forcing
sees future tokens and overstates accuracy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_parallel import all_reduce_sum
from vlm_strategies import IGNORE_INDEX, shift_labels
from vlm_train.data import ImageTextCollator, ImageTextDataset

__all__ = ["EvalResult", "evaluate", "format_eval"]


@dataclass
class EvalResult:
    """Exact-match accuracy (and loss) on a split.

    Attributes:
        by_frames: real frame count -> ``(correct, total)`` (clips; ``{1: ...}`` for images).
        examples: a few ``(reference, prediction)`` pairs, mistakes first.
    """

    correct: int
    total: int
    loss: float | None
    by_frames: dict[int, tuple[int, int]] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "loss": self.loss,
            "by_frames": {
                str(k): {"correct": c, "total": t, "accuracy": c / t if t else 0.0}
                for k, (c, t) in sorted(self.by_frames.items())
            },
            "examples": [{"reference": r, "prediction": p} for r, p in self.examples],
        }


def rank_batches(
    n: int, rank: int, world_size: int, batch_size: int
) -> Iterator[tuple[list[int], list[bool]]]:
    """Rank ``rank``'s share of samples ``0..n-1`` (``rank::world_size``) in batches of
    ``batch_size``: ``(indices, live)``.  Every rank gets the same number of equally sized
    batches (sharded models run collectives in every forward); the padding rows repeat
    sample 0 with ``live`` False and must not be counted."""
    mine = list(range(rank, n, world_size))
    per_rank = -(-n // world_size)
    live = [True] * len(mine) + [False] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    for start in range(0, per_rank, batch_size):
        yield mine[start : start + batch_size], live[start : start + batch_size]


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on ``device`` when ``bf16``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class ExampleLog:
    """A few ``(reference, prediction)`` pairs for the report: the first 3, then mistakes
    until 8 are kept; :meth:`ordered` puts the mistakes first."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []

    def add(self, reference: str, prediction: str) -> None:
        if len(self.pairs) < 3 or (reference != prediction and len(self.pairs) < 8):
            self.pairs.append((reference, prediction))

    def ordered(self) -> list[tuple[str, str]]:
        mistakes = [e for e in self.pairs if e[0] != e[1]]
        return (mistakes + [e for e in self.pairs if e[0] == e[1]])[:8]


def evaluator_for(collator: Any) -> Callable[..., EvalResult]:
    """The held-out evaluation that goes with ``collator``: :func:`evaluate` for the
    caption collator, :func:`vlm_train.inference.evaluate_conversations` for any other
    (conversations: the generated last reply of each)."""
    if isinstance(collator, ImageTextCollator):
        return evaluate
    from vlm_train.inference import evaluate_conversations

    return evaluate_conversations  # type: ignore[no-any-return]


def format_eval(result: EvalResult, split: str = "held-out") -> list[str]:
    """Human-readable lines (the first is the headline)."""
    loss = f", loss {result.loss:.4f}" if result.loss is not None else ""
    lines = [
        f"{split} exact-match accuracy: {100 * result.accuracy:.2f}% "
        f"({result.correct}/{result.total}){loss}"
    ]
    if len(result.by_frames) > 1:
        for n, (c, t) in sorted(result.by_frames.items()):
            lines.append(f"  clips of {n} frame(s): {100 * c / t:.2f}% ({c}/{t})")
    mistakes = [(r, p) for r, p in result.examples if r != p]
    for ref, pred in mistakes[:3]:
        lines.append(f"  e.g. expected {ref!r}, generated {pred!r}")
    return lines


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageTextDataset,
    collator: ImageTextCollator,
    *,
    batch_size: int = 256,
    max_samples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    autocast_bf16: bool = False,
    compute_loss: bool = True,
) -> EvalResult:
    """Loss and exact-match caption accuracy of ``model`` (a ``VLMWrapper``) on ``dataset``.

    With ``world_size > 1`` every rank must call this (sharded models run collectives):
    rank ``r`` takes samples ``r::world_size``, all ranks run the same number of equally
    sized batches and decode a fixed number of tokens (no early stop), and the counts
    are summed over ranks.
    """
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    tok = collator.tokenizer
    device = torch.device(device)
    ctx = autocast_context(device, autocast_bf16)
    was_training = model.training
    model.eval()
    correct = 0
    loss_sum = 0.0
    loss_tokens = 0.0
    by_frames: dict[int, list[int]] = {}
    examples = ExampleLog()
    try:
        for idx, wts in rank_batches(n, rank, world_size, batch_size):
            batch = collator([dataset[i] for i in idx])
            pixels = batch["pixel_values"].to(device)
            frame_mask = batch["frame_mask"]
            if frame_mask is not None:
                frame_mask = frame_mask.to(device)
            live = torch.tensor(wts, dtype=torch.bool)
            if compute_loss:
                with ctx:
                    logits, _ = model(pixels, batch["input_ids"].to(device), None, frame_mask)
                labels = shift_labels(batch["labels"]).to(device)
                ce = F.cross_entropy(
                    logits.float().flatten(0, 1),
                    labels.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="none",
                ).view_as(labels)
                keep = (labels != IGNORE_INDEX) & live[:, None].to(device)
                loss_sum += float((ce * keep).sum())
                loss_tokens += float(keep.sum())
            prompt_ids, prompt_mask = collator.prompt_batch(batch["prompts"])
            room = collator.max_text_len - prompt_ids.shape[1]
            with ctx:
                out = model.generate(  # type: ignore[operator]
                    pixels,
                    prompt_ids.to(device),
                    frame_mask=frame_mask,
                    max_new_tokens=max(room, 1),
                    eos_token_id=tok.eos_id if world_size == 1 else None,
                    attention_mask=prompt_mask.to(device),
                )
            generated = out[:, prompt_ids.shape[1] :].cpu().tolist()
            for row, w in enumerate(wts):
                if not w:
                    continue
                ref = tok.normalize(batch["captions"][row])
                pred = tok.decode(generated[row])
                ok = ref == pred
                correct += int(ok)
                frames = int(batch["meta"][row].get("num_frames", 1))
                stats = by_frames.setdefault(frames, [0, 0])
                stats[0] += int(ok)
                stats[1] += 1
                examples.add(ref, pred)
    finally:
        model.train(was_training)
    keys = sorted(set(range(1, 65)))  # frame counts are small; reduce a fixed-size vector
    vec = [float(correct), loss_sum, loss_tokens]
    for k in keys:
        c, t = by_frames.get(k, [0, 0])
        vec += [float(c), float(t)]
    vec = all_reduce_sum(vec) if world_size > 1 else vec
    frames_out = {
        k: (int(vec[3 + 2 * i]), int(vec[4 + 2 * i]))
        for i, k in enumerate(keys)
        if vec[4 + 2 * i] > 0
    }
    return EvalResult(
        correct=int(vec[0]),
        total=n,
        loss=(vec[1] / vec[2]) if compute_loss and vec[2] > 0 else None,
        by_frames=frames_out,
        examples=examples.ordered(),
    )
