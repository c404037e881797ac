"""Reading checkpoint files without running code from them.

* :func:`_serialize_plain` / :func:`_load_plain`: ``torch.save`` bytes checked to load
  back with ``torch.load(weights_only=True)``, and that load with one-line
  :class:`CheckpointError` messages (``trainer_state.pt``, ``rank_*.pt``).
* :class:`_MetadataUnpickler` / :class:`_SafeReader`: DCP's ``.metadata`` (a pickle that
  ``FileSystemReader`` reads with plain ``pickle.load``) read admitting only DCP's
  metadata classes, ``torch`` dtypes / ``Size`` / layouts and ``pathlib`` paths;
  :func:`_read_metadata` also checks the ``.distcp`` files it names.
* :class:`_SafePlanner`: DCP's non-tensor entries (which ``DefaultLoadPlanner`` reads
  with ``torch.load(weights_only=False)``) must first load with ``weights_only=True``.
* :func:`_dcp_load`: ``dcp.load`` through that reader and planner; :func:`_refusal`: the
  message of a refused file.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from vlm_parallel.dist import is_distributed
from vlm_parallel.errors import CheckpointError, _first_failure, _reason

_METADATA_FILE = ".metadata"


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save/load; that case is intended here."""
    with warnings.catch_warnings():
        if not is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _is_unsafe_pickle(exc: BaseException) -> bool:
    return "Weights only load failed" in str(exc) or "is not allowed in DCP metadata" in str(exc)


def _serialize_plain(obj: Any, what: str) -> bytes:
    """``torch.save`` bytes of ``obj``, checked to load back with ``weights_only=True``.

    Raises:
        ValueError: ``obj`` holds something other than plain Python values (dict, list,
            tuple, set, str, bytes, int, float, bool, None) and tensors.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{what} cannot be checkpointed safely ({_reason(exc)}): use plain Python values "
            "(dict, list, tuple, set, str, bytes, int, float, bool, None) and tensors"
        ) from None
    return data


def _refusal(path: Path, exc: BaseException, what: str = "", holds: str = "") -> CheckpointError:
    """The error for ``path``, refused because unpickling it could run code."""
    return CheckpointError(
        f"{path}: refused to load{what} ({_reason(exc)}); {holds}unpickling it could run code"
    )


def _load_plain(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line :class:`CheckpointError`s."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if _is_unsafe_pickle(exc):
            holds = "it holds objects other than plain values and tensors, and "
            raise _refusal(path, exc, holds=holds) from None
        raise CheckpointError(f"{path} is not a readable {what} file ({_reason(exc)})") from None


# -------------------------------------------------------- DCP without arbitrary pickle
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata`` admitting only data classes (no code execution)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _METADATA_GLOBALS
        if module == "torch":
            allowed = allowed or isinstance(getattr(torch, name, None), torch.dtype)
        elif module == "torch.distributed.checkpoint.metadata":
            allowed = isinstance(getattr(dcp_metadata, name, None), type)
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")
        return super().find_class(module, name)


class _SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = _METADATA_FILE if rank is None else f"__{rank}{_METADATA_FILE}"
        path = self.fs.concat_path(self.path, name)
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


_REFUSED_ENTRY = "refused: not plain data"


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor entries must load with ``weights_only=True`` before DCP reads them."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise pickle.UnpicklingError(
                f"entry {read_item.dest_index.fqn} {_REFUSED_ENTRY} ({_reason(exc)})"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _read_metadata(path: Path) -> Metadata:
    """The checkpoint's DCP metadata, checked against the ``.distcp`` files it names.

    Raises:
        CheckpointError: ``.metadata`` missing / unreadable / unsafe, or a data file
            missing or shorter than the metadata says.
    """
    file = path / _METADATA_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing (DCP metadata); the checkpoint is incomplete")
    try:
        metadata = _SafeReader(path).read_metadata()
    except Exception as exc:
        if _is_unsafe_pickle(exc):
            raise _refusal(file, exc) from None
        raise CheckpointError(f"{file} is not readable DCP metadata ({_reason(exc)})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        if rel:
            needed[rel] = max(needed.get(rel, 0), end)
    for rel, end in sorted(needed.items()):
        data = path / rel
        if not data.is_file():
            raise CheckpointError(f"{data} is missing (named by {_METADATA_FILE})")
        size = data.stat().st_size
        if size < end:
            raise CheckpointError(
                f"{data} is truncated ({size} bytes; {_METADATA_FILE} expects at least {end})"
            )
    return metadata


def _dcp_load(path: Path, state: dict[str, Any]) -> None:
    """``dcp.load`` of ``state`` from ``path`` through :class:`_SafeReader` and
    :class:`_SafePlanner` (collective when distributed).

    Raises:
        CheckpointError: a refused (unsafe) entry or metadata, or any failure reading
            the shards (the first rank's failure in the message).
    """
    try:
        with _single_process_quiet():
            dcp.load(
                state,
                checkpoint_id=str(path),
                storage_reader=_SafeReader(path),
                planner=_SafePlanner(),
                no_dist=not is_distributed(),
            )
    except (Exception, CheckpointException) as exc:
        inner = _first_failure(exc)
        if _is_unsafe_pickle(inner) or _REFUSED_ENTRY in str(inner):
            raise _refusal(path, exc, what=" DCP data") from None
        raise CheckpointError(f"{path}: reading the DCP shards failed ({_reason(exc)})") from None
