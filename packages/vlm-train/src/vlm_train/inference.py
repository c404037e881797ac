"""Load a trained model for evaluation / generation, and caption images with it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm_config import JobConfig, load_job_config
from vlm_data.collate import ImageTextCollator
from vlm_data.images import load_image
from vlm_data.images import pad_clip as _pad_clip
from vlm_train.errors import CaptionTooLongError, DataError, VLMTrainError
from vlm_train.tokenizer import TextTokenizer

__all__ = ["LoadedModel", "caption_images", "load_trained"]


@dataclass
class LoadedModel:
    model: Any
    job: JobConfig
    tokenizer: TextTokenizer
    source: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def collator(self) -> ImageTextCollator:
        return ImageTextCollator(self.tokenizer, self.job.arch.max_text_len)


def _tokenizer_near(*folders: Path) -> TextTokenizer:
    for folder in folders:
        if (folder / "tokenizer.json").is_file():
            return TextTokenizer.load(folder / "tokenizer.json")
    raise VLMTrainError(f"no tokenizer.json in {', '.join(str(f) for f in folders)}")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_trained(path: str | Path, *, warn: Callable[[str], None] | None = None) -> LoadedModel:
    """A model from an export folder (``model.safetensors`` + ``job.toml``), a run folder
    (its latest readable checkpoint, else its ``final`` export) or one checkpoint folder
    of a run.

    Only the model parameters are read: no optimizer, scheduler or RNG state is built or
    loaded.  Nothing is unpickled beyond plain values and tensors (see
    ``vlm_parallel.CheckpointManager``); an export reads only safetensors and TOML.  For
    a run folder an unreadable newest checkpoint is skipped with a one-line warning and
    the previous complete one is loaded.  Single process only (call it without
    ``torchrun``).

    Args:
        warn: receives fall-back warnings (default: printed to stderr).

    Raises:
        VLMTrainError: the path is none of these, its files are missing, corrupt or
            unsafe, no checkpoint of the run loads, or ``job.toml`` no longer matches
            the saved weights (the message names ``job.toml`` and the parameter).
    """
    from vlm_parallel import CheckpointError, CheckpointMismatchError

    warn = _stderr if warn is None else warn
    path = Path(path).expanduser()
    if not path.exists():
        raise VLMTrainError(f"checkpoint or export folder not found: {path}")
    if (path / "model.safetensors").is_file():
        from vlm_parallel import load_consolidated

        try:
            model, job = load_consolidated(path)
        except CheckpointError as exc:
            raise VLMTrainError(str(exc)) from exc
        tok = _tokenizer_near(path, path.parent)
        if job.data.tokenizer is not None and not (path / "tokenizer.json").is_file():
            tok = TextTokenizer.load(job.data.tokenizer)
        model.eval()
        return LoadedModel(model, job, tok, path)
    if path.parent.name == "checkpoints" and (path.parent.parent / "job.toml").is_file():
        run_dir, ckpt_path = path.parent.parent, path
    elif (path / "job.toml").is_file():
        run_dir, ckpt_path = path, None
    else:
        raise VLMTrainError(
            f"{path} is not an export folder (model.safetensors + job.toml), a run folder "
            "(job.toml + checkpoints/) or a checkpoint folder of a run"
        )
    from vlm_parallel import CheckpointManager, build_parallel_vlm, init_distributed

    job_file = run_dir / "job.toml"
    job = load_job_config(job_file)
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=job.train.keep_checkpoints)
    final = run_dir / "final"
    if ckpt_path is None and manager.latest() is None:
        if (final / "model.safetensors").is_file():
            return load_trained(final, warn=warn)
        raise VLMTrainError(f"{run_dir} has no checkpoint yet")
    model = build_parallel_vlm(job, init_distributed(job.parallel), job.train.seed)
    try:
        if ckpt_path is not None:
            manager.load_model(ckpt_path, model)
        else:
            info = manager.load_latest(model, model_only=True, warn=warn)
            if info is None:  # deleted since latest() looked
                raise VLMTrainError(f"{run_dir} has no checkpoint yet")
            ckpt_path = info["path"]
    except CheckpointMismatchError as exc:
        raise VLMTrainError(
            f"{job_file} does not match the saved weights ({exc}); was it edited after training?"
        ) from exc
    except CheckpointError as exc:
        hint = ""
        if ckpt_path is None and (final / "model.safetensors").is_file():
            hint = f"; the run's export {final} can be loaded instead"
        raise VLMTrainError(f"{exc}{hint}") from exc
    except FileNotFoundError as exc:
        raise VLMTrainError(str(exc)) from exc
    model.eval()
    return LoadedModel(model, job, _tokenizer_near(run_dir), Path(ckpt_path))


@torch.no_grad()
def caption_images(
    loaded: LoadedModel,
    image_files: list[str | Path],
    prompt: str | None = None,
    max_new_tokens: int | None = None,
) -> str:
    """Generate text (greedy) for one image, or one clip of several image files.

    Raises:
        DataError: a missing / unreadable image, too many frames, or a prompt that leaves
            no room in ``arch.max_text_len``.
    """
    job, model = loaded.job, loaded.model
    prompt = job.data.prompt if prompt is None else prompt
    images = [load_image(p) for p in image_files]
    frames = job.arch.frames_per_clip
    if frames == 1 and len(images) != 1:
        raise DataError(f"this model takes one image, got {len(images)}")
    pixels = model.vision_encoder.preprocess(images)
    frame_mask = None
    if frames > 1:
        clip, mask = _pad_clip(pixels, frames)
        pixels, frame_mask = clip[None], mask[None]
    collator = loaded.collator
    room = collator.max_new_tokens(prompt)
    if room < 1:
        raise CaptionTooLongError(
            f"the prompt takes {job.arch.max_text_len - room} tokens (with BOS) but "
            f"arch.max_text_len is {job.arch.max_text_len}; shorten it"
        )
    ids, mask = collator.prompt_batch([prompt])
    dev = loaded.device
    out = model.generate(
        pixels.to(dev),
        ids.to(dev),
        frame_mask=None if frame_mask is None else frame_mask.to(dev),
        max_new_tokens=min(room, max_new_tokens or room),
        eos_token_id=loaded.tokenizer.eos_id,
        attention_mask=mask.to(dev),
    )
    return loaded.tokenizer.decode(out[0, ids.shape[1] :].tolist())
