"""The ``[data]`` section: a dataset plugin (entry-point group ``vlm.datasets``).

``[data]`` validates into the installed dataset config class chosen by its ``type``
(``digits``, ``digits_video``, ``jsonl``, ``hf``, ``webdataset`` ship with ``vlm-data``;
third-party distributions add more through the same entry points).  Every dataset config
subclasses :class:`DatasetConfig`, which holds the fields common to all datasets (prompt,
tokeniser, evaluation batch, input-pipeline workers, what to do with a bad sample); the
subclass adds its own fields and names its torch-side builder in the class variable
``implementation``.

Old configs (``source = "digits"`` and the flat per-source fields of vlm-config 0.1)
still load: :func:`migrate_legacy_data` rewrites them and warns with
:class:`ConfigDeprecationWarning`.  Nothing here imports torch.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

from pydantic import Field

from vlm_config.components import ComponentConfig

__all__ = [
    "ConfigDeprecationWarning",
    "DataConfig",
    "DatasetConfig",
    "NoDatasetConfig",
    "migrate_legacy_data",
]


class ConfigDeprecationWarning(FutureWarning):
    """A config written in a form that still loads but will stop loading (shown by
    default, unlike ``DeprecationWarning``)."""


class DatasetConfig(ComponentConfig):
    """Base config of a dataset (entry-point group ``vlm.datasets``, discriminator ``type``).

    Builder contract (torch side, ``implementation = "module:callable"``):
    ``(config, context) -> dict[str, Dataset]`` with a ``"train"`` split and, when the
    dataset has one, a ``"test"`` split (see ``vlm_data.DatasetContext`` and
    docs/data.md).

    Common fields (every dataset has them):

    Attributes:
        prompt: text before the caption (loss-masked); a record may carry its own.
        tokenizer: a local folder holding ``tokenizer.json`` (or the file itself);
            ``None`` trains a small ``tokenizer_type`` tokeniser on the training captions
            and saves it to the run folder.
        num_workers: ``DataLoader`` worker processes that read, decode, preprocess and
            augment training samples in the background (0: in the training process).
        prefetch_factor: micro-batches each worker prepares ahead.
        on_bad_sample: ``"error"`` stops at the first unreadable sample with a message
            naming the file, the record and what is wrong; ``"skip"`` replaces it by the
            next readable sample of the dataset, counts it and logs it.
        eval_batch_size / max_eval_samples: held-out evaluation.
        packing: training micro-batches pack several samples into each row
            (``vlm_data.PackingCollator``: first-fit decreasing, no padding between
            samples, attention/positions/routing restart per sample); the loss is the
            same per-token mean as unpacked, over the same samples.  Evaluation is
            never packed.
        packed_length: positions per packed row; ``None``: ``model.max_seq_len``.  A
            sample (image placeholders + text) longer than this is an error.
    """

    type: str
    prompt: str = Field(default="", description="text before the caption (loss-masked)")
    tokenizer: str | None = Field(
        default=None, description="local tokenizer folder / tokenizer.json; None: train one"
    )
    tokenizer_type: Literal["wordlevel", "bpe"] = "wordlevel"
    bpe_vocab_size: int = Field(default=512, ge=32)
    num_workers: int = Field(
        default=2,
        ge=0,
        description="DataLoader worker processes decoding / augmenting training samples",
    )
    prefetch_factor: int = Field(default=2, ge=1, description="micro-batches per worker ahead")
    on_bad_sample: Literal["error", "skip"] = Field(
        default="error", description="an unreadable sample stops the run, or is skipped"
    )
    eval_batch_size: int = Field(default=256, ge=1)
    max_eval_samples: int | None = Field(default=None, ge=1)
    packing: bool = Field(default=False, description="pack several training samples into each row")
    packed_length: int | None = Field(
        default=None, ge=1, description="positions per packed row; None: model.max_seq_len"
    )


#: The name ``vlm_config.DataConfig`` of vlm-config 0.1, kept for imports: the base class.
DataConfig = DatasetConfig


class NoDatasetConfig(DatasetConfig):
    """``type = "none"``: a job that names no dataset (registered by vlm-config itself).

    A job without a ``[data]`` section takes the ``digits`` dataset when a distribution
    provides it (vlm-data), else this one, so that building, sharding or exporting a
    model from a config never needs a data package.  Training or evaluating with it
    raises an error naming the fix.
    """

    type: Literal["none"] = "none"
    implementation: ClassVar[str] = "vlm_config.data:build_no_dataset"


def build_no_dataset(*_args: Any, **_kwargs: Any) -> Any:
    """The builder of :class:`NoDatasetConfig`: always raises.

    Raises:
        ValueError: always; the job has no ``[data]`` section and no default dataset
            plugin is installed.
    """
    raise ValueError(
        "this job names no dataset ([data] type = 'none'): install vlm-data "
        "(pip install 'vlm-data[digits]') and set [data] type, e.g. 'digits' or 'jsonl'"
    )


_LEGACY_TYPES = {"digits": "digits", "digits_video": "digits_video", "files": "jsonl", "hf": "hf"}
_LEGACY_RENAMES = {
    "hf_path": "path",
    "hf_name": "name",
    "hf_train_split": "train_split",
    "hf_test_split": "test_split",
    "hf_image_column": "image_column",
    "hf_text_column": "text_column",
}
_LEGACY_FIELDS = {
    "test_fraction",
    "split_seed",
    "min_frames",
    "max_frames",
    "train_clips",
    "test_clips",
    "curriculum_steps",
    "augment_shift",
    "train_file",
    "test_file",
    *_LEGACY_RENAMES,
}


def migrate_legacy_data(value: Any, fields_of: Any = None) -> Any:
    """Rewrite a vlm-config 0.1 ``[data]`` table (``source = ...`` and flat per-source
    fields) into the plugin form (``type = ...``), warning once with
    :class:`ConfigDeprecationWarning` what was rewritten.

    Args:
        value: the raw ``data`` section (anything else is returned unchanged).
        fields_of: ``type name -> set of field names`` of the installed dataset classes
            (or ``None``); legacy fields the chosen dataset does not have (e.g.
            ``min_frames`` with ``source = "digits"``, accepted but unused in 0.1) are
            dropped and listed in the warning.

    Raises:
        ValueError: ``source`` names no 0.1 source, or is given together with ``type``.
    """
    if not isinstance(value, dict) or "source" not in value:
        return value
    data = dict(value)
    source = data.pop("source")
    if "type" in data:
        raise ValueError(
            f"data: 'source' ({source!r}) is the old name of 'type' ({data['type']!r}); "
            "give only 'type'"
        )
    if source not in _LEGACY_TYPES:
        raise ValueError(
            f"data.source={source!r} is not a source of the old [data] form (allowed: "
            f"{', '.join(_LEGACY_TYPES)}); write type = '<dataset>' (see `vlm plugins`)"
        )
    new_type = _LEGACY_TYPES[source]
    data["type"] = new_type
    renamed = []
    for old, new in _LEGACY_RENAMES.items():
        if old in data:
            data[new] = data.pop(old)
            renamed.append(f"{old} -> {new}")
    dropped = []
    known = fields_of(new_type) if callable(fields_of) else None
    if known is not None:
        for key in sorted(set(data) & (_LEGACY_FIELDS | set(_LEGACY_RENAMES.values()))):
            if key not in known:
                data.pop(key)
                dropped.append(key)
    parts = [f"source = {source!r} -> type = {new_type!r}", *renamed]
    message = "[data] uses the vlm-config 0.1 form; read as: " + "; ".join(parts)
    if dropped:
        message += f"; dropped fields the {new_type!r} dataset does not use: {', '.join(dropped)}"
    message += ". Rewrite the section (see docs/data.md); the old form will stop loading in 0.3."
    warnings.warn(message, ConfigDeprecationWarning, stacklevel=2)
    return data
