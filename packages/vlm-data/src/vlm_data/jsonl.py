"""The ``jsonl`` dataset: manifests of local image files (or none) and text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_data.dataset import DatasetContext, ImageTextDataset, Preprocess, Sample
from vlm_data.errors import DataError
from vlm_data.images import load_image, pad_clip

if TYPE_CHECKING:
    from vlm_data.configs import JsonlDatasetConfig

__all__ = ["FilesDataset", "JsonlDataset", "build_jsonl"]


def read_jsonl_records(manifest: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every non-blank line of a JSON-lines manifest.

    Raises:
        DataError: the manifest is missing, or a line is not a JSON object (the message
            names ``file:line``).
    """
    if not manifest.is_file():
        raise DataError(f"manifest not found: {manifest}")
    records: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{manifest}:{n}: not valid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise DataError(
                f"{manifest}:{n}: a record must be a JSON object, got {type(row).__name__}"
            )
        records.append((n, row))
    return records


class JsonlDataset(ImageTextDataset):
    """Samples listed in a JSONL manifest; images read with PIL in the loader's workers.

    Each line: ``{"image": "path.png", "caption": "...", "prompt": "..."}``, a clip
    ``{"images": ["f0.png", "f1.png"], ...}``, or a text-only sample with neither
    ``image`` nor ``images``.  Relative paths are relative to the manifest's folder.
    The manifest is checked when the dataset is built (JSON, ``caption`` a string,
    ``image`` a string, ``images`` a non-empty list of strings); image files are read
    when a sample is drawn.

    Args:
        frames_per_clip: ``> 1`` makes every image sample a clip padded to this many
            frames.

    Raises:
        DataError: a missing manifest or a malformed line (the message names the file,
            the line number, what is wrong and what is allowed).
    """

    captions_known = True

    def __init__(
        self,
        manifest: str | Path,
        preprocess: Preprocess,
        *,
        prompt: str = "",
        frames_per_clip: int = 1,
    ) -> None:
        self.manifest = Path(manifest)
        self.preprocess = preprocess
        self.prompt = prompt
        self.frames_per_clip = frames_per_clip
        records = read_jsonl_records(self.manifest)
        self.lines: list[int] = [n for n, _ in records]
        self.rows: list[dict[str, Any]] = [self._row(row, n) for n, row in records]

    def _row(self, row: dict[str, Any], n: int) -> dict[str, Any]:
        where = f"{self.manifest}:{n}"
        if not isinstance(row.get("caption"), str):
            raise DataError(f"{where}: needs a 'caption' string (the text to learn)")
        if "images" in row:
            images = row["images"]
            if not (
                isinstance(images, list) and images and all(isinstance(p, str) for p in images)
            ):
                raise DataError(f"{where}: 'images' must be a non-empty list of file paths")
        elif "image" in row:
            if not isinstance(row["image"], str):
                raise DataError(f"{where}: 'image' must be a file path string")
            images = [row["image"]]
        else:
            images = []  # a text-only sample
        if "prompt" in row and not isinstance(row["prompt"], str):
            raise DataError(f"{where}: 'prompt' must be a string")
        return {**row, "images": [str(self.manifest.parent / p) for p in images]}

    def __len__(self) -> int:
        return len(self.rows)

    def captions(self) -> list[str]:
        return [str(r["caption"]) for r in self.rows]

    def describe(self, index: int) -> str:
        return f"{self.manifest}:{self.lines[index]}"

    def __getitem__(self, index: int) -> Sample:
        row = self.rows[index]
        record = self.describe(index)
        sample: Sample = {
            "prompt": str(row.get("prompt", self.prompt)),
            "caption": str(row["caption"]),
            "meta": {"num_frames": len(row["images"]), "record": record},
        }
        if not row["images"]:
            return sample
        pixels = self.preprocess([load_image(p, record=record) for p in row["images"]])
        if self.frames_per_clip > 1:
            try:
                sample["pixel_values"], sample["frame_mask"] = pad_clip(
                    pixels, self.frames_per_clip
                )
            except DataError as exc:
                raise DataError(f"{record}: {exc}") from exc
        else:
            if pixels.shape[0] != 1:
                raise DataError(
                    f"{record}: lists {pixels.shape[0]} images but arch.frames_per_clip is 1 "
                    "(one 'image' per record)"
                )
            sample["pixel_values"] = pixels[0]
        return sample


#: The name of :class:`JsonlDataset` in vlm-train 0.1 (``source = "files"``).
FilesDataset = JsonlDataset


def build_jsonl(config: JsonlDatasetConfig, context: DatasetContext) -> dict[str, ImageTextDataset]:
    """Builder of the ``jsonl`` dataset (``test`` only when ``test_file`` is set)."""
    files = {"train": config.train_file, "test": config.test_file}
    return {
        split: JsonlDataset(
            files[split] or "",
            context.preprocess,
            prompt=config.prompt,
            frames_per_clip=context.frames_per_clip,
        )
        for split in context.splits
        if files.get(split) is not None
    }
