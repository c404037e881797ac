"""The ``hf`` dataset: a local Hugging Face ``datasets`` folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_data.dataset import DatasetContext, ImageTextDataset, Preprocess, Sample
from vlm_data.errors import DataError
from vlm_data.images import load_image, to_rgb

if TYPE_CHECKING:
    from vlm_data.configs import HFDatasetConfig

__all__ = ["HFImageTextDataset", "build_hf"]


class HFImageTextDataset(ImageTextDataset):
    """A Hugging Face ``datasets`` split with an image column and a text column.

    ``datasets`` is imported lazily (install ``vlm-data[hf]``).  ``path`` is a folder
    written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` or anything
    ``datasets.load_dataset`` reads locally (e.g. ``"imagefolder"``); nothing is
    downloaded by this class itself.  An image cell may be a PIL image, a file path, or
    ``None`` (a text-only sample).
    """

    captions_known = True

    def __init__(
        self,
        path: str,
        split: str,
        preprocess: Preprocess,
        *,
        name: str | None = None,
        image_column: str = "image",
        text_column: str = "text",
        prompt: str = "",
    ) -> None:
        try:
            import datasets
        except ImportError as exc:
            raise DataError(
                "data.type='hf' needs the 'datasets' package: pip install 'vlm-data[hf]'"
            ) from exc
        self.path, self.split = path, split
        self.preprocess = preprocess
        self.prompt = prompt
        self.image_column = image_column
        self.text_column = text_column
        local = Path(path).expanduser()
        try:
            if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                loaded = datasets.load_from_disk(str(local))
                ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            else:
                ds = datasets.load_dataset(path, name, split=split)
        except Exception as exc:
            raise DataError(f"cannot load dataset {path!r} split {split!r}: {exc}") from exc
        missing = [c for c in (image_column, text_column) if c not in ds.column_names]
        if missing:
            raise DataError(
                f"dataset {path!r} has no column(s) {missing}; columns: {ds.column_names} "
                "(set data.image_column / data.text_column)"
            )
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def captions(self) -> list[str]:
        return [str(t) for t in self.ds[self.text_column]]

    def describe(self, index: int) -> str:
        return f"{self.path} split {self.split!r} row {index}"

    def __getitem__(self, index: int) -> Sample:
        record = self.describe(index)
        try:
            row = self.ds[int(index)]
        except Exception as exc:  # a cell that fails to decode (corrupt image bytes)
            raise DataError(f"{record}: cannot read the row: {exc}") from exc
        image: Any = row[self.image_column]
        sample: Sample = {
            "prompt": self.prompt,
            "caption": str(row[self.text_column]),
            "meta": {"num_frames": 0 if image is None else 1, "record": record},
        }
        if image is None:
            return sample
        if isinstance(image, (str, Path)):
            image = load_image(image, record=record)
        else:
            image = to_rgb(image)
        sample["pixel_values"] = self.preprocess([image])[0]
        return sample


def build_hf(config: HFDatasetConfig, context: DatasetContext) -> dict[str, ImageTextDataset]:
    """Builder of the ``hf`` dataset."""
    names = {"train": config.train_split, "test": config.test_split}
    return {
        split: HFImageTextDataset(
            config.path,
            names.get(split, split),
            context.preprocess,
            name=config.name,
            image_column=config.image_column,
            text_column=config.text_column,
            prompt=config.prompt,
        )
        for split in context.splits
    }
