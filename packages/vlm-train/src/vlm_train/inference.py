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

__all__ = [
    "LoadedModel",
    "caption_images",
    "chat_generate",
    "conversation_predictions",
    "evaluate_conversations",
    "load_trained",
    "to_media_batch",
]


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
    def collator(self) -> Any:
        """The job's collator: a :class:`vlm_data.ConversationCollator` for conversation
        datasets (chat template, images anywhere), else the caption collator."""
        from vlm_data.conversation import is_conversation_job

        if is_conversation_job(self.job):
            return conversation_collator(self.job, self.tokenizer)
        return ImageTextCollator(self.tokenizer, self.job.arch.max_text_len)

    @property
    def is_chat(self) -> bool:
        """Whether the model was trained on conversations (``vlm generate`` applies the
        chat template and places images at their ``<image>`` markers)."""
        from vlm_data.conversation import is_conversation_job

        return is_conversation_job(self.job)


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


# ----------------------------------------------------------------- conversations
def conversation_collator(job: JobConfig, tokenizer: TextTokenizer) -> Any:
    """The :class:`vlm_data.ConversationCollator` of a conversation job, built from the
    config alone (no dataset read): chat format, placeholders per image, row length."""
    from vlm_data.chat import ConversationCollator, load_chat_format
    from vlm_data.conversation import image_placeholders

    data: Any = job.data
    return ConversationCollator(
        tokenizer,
        load_chat_format(data.chat_template, data.tokenizer, tokenizer),
        placeholders=image_placeholders(job),
        max_length=data.max_length or job.model.max_seq_len,
        loss_on=data.loss_on,
        image_token=data.image_token,
    )


def to_media_batch(batch: dict[str, Any], device: torch.device | str = "cpu") -> Any:
    """A collated conversation batch (training or :meth:`ConversationCollator.prompt_batch`)
    as a ``vlm_strategies.MediaBatch`` on ``device``."""
    from vlm_strategies import MediaBatch

    fields: dict[str, Any] = {}
    for key in (
        "input_ids",
        "image_token_id",
        "pixel_values",
        "image_sample_index",
        "attention_mask",
        "labels",
        "placeholder_mask",
    ):
        if key in batch:
            value = batch[key]
            fields[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    return MediaBatch(**fields)


@torch.no_grad()
def conversation_predictions(
    model: Any,
    samples: list[Any],
    collator: Any,
    *,
    device: torch.device | str = "cpu",
    stop_at_eos: bool = True,
    autocast_bf16: bool = False,
) -> list[str]:
    """Greedy replies of ``model`` to each sample's turns before its last assistant turn
    (chat template + generation prompt, images at their markers), one batched
    ``model.generate`` call with the KV cache (full recomputation for non-causal
    archs), decoded to text."""
    device = torch.device(device)
    prompts = collator.prompt_batch(samples)
    room = collator.max_new_tokens(prompts["input_ids"].shape[1])
    if room < 1:
        raise CaptionTooLongError(
            f"the prompts take {prompts['input_ids'].shape[1]} tokens; rows hold "
            f"{collator.max_length}: no room to generate"
        )
    from vlm_train.evaluate import autocast_context

    tok = collator.tokenizer
    with autocast_context(device, autocast_bf16):
        out = model.generate(
            to_media_batch(prompts, device),
            max_new_tokens=room,
            eos_token_id=tok.eos_id if stop_at_eos else None,
            pad_token_id=tok.pad_id,
        )
    width = prompts["input_ids"].shape[1]
    return [tok.decode(row) for row in out[:, width:].cpu().tolist()]


@torch.no_grad()
def evaluate_conversations(
    model: Any,
    dataset: Any,
    collator: Any,
    *,
    batch_size: int = 256,
    max_samples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    autocast_bf16: bool = False,
    compute_loss: bool = True,
) -> Any:
    """Held-out loss (teacher-forced, on the ``loss_on`` tokens) and exact-match accuracy
    of the generated last reply of every conversation (:func:`conversation_predictions`).

    Collective like :func:`vlm_train.evaluate.evaluate`: with ``world_size > 1`` rank
    ``r`` takes samples ``r::world_size``, every rank runs the same number of equally
    sized batches and decodes a fixed number of tokens, and counts are summed.
    ``EvalResult.by_frames`` is empty (conversations have no clips).
    """
    from vlm_parallel import all_reduce_sum
    from vlm_train.evaluate import EvalResult, ExampleLog, autocast_context, rank_batches

    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    device = torch.device(device)
    tok = collator.tokenizer
    was_training = model.training
    model.eval()
    correct, loss_sum, loss_tokens = 0, 0.0, 0.0
    examples = ExampleLog()
    ctx = autocast_context(device, autocast_bf16)
    try:
        for idx, wts in rank_batches(n, rank, world_size, batch_size):
            samples = [dataset[i] for i in idx]
            if compute_loss:
                batch = collator(samples)
                live = torch.tensor(wts, dtype=torch.bool)[:, None]
                batch["labels"] = batch["labels"].masked_fill(~live, -100)
                count = float((batch["labels"][:, 1:] != -100).sum())
                if count:
                    with ctx:
                        loss = model.loss(to_media_batch(batch, device))
                    loss_sum += float(loss) * count
                    loss_tokens += count
            preds = conversation_predictions(
                model,
                samples,
                collator,
                device=device,
                stop_at_eos=world_size == 1,
                autocast_bf16=autocast_bf16,
            )
            for sample, pred, w in zip(samples, preds, wts, strict=True):
                if not w:
                    continue
                ref = tok.normalize(sample["messages"][-1]["content"])
                ok = ref == pred
                correct += int(ok)
                examples.add(ref, pred)
    finally:
        model.train(was_training)
    vec = [float(correct), loss_sum, loss_tokens]
    if world_size > 1:
        vec = all_reduce_sum(vec)
    return EvalResult(
        correct=int(vec[0]),
        total=n,
        loss=(vec[1] / vec[2]) if compute_loss and vec[2] > 0 else None,
        examples=examples.ordered(),
    )


@torch.no_grad()
def chat_generate(
    loaded: LoadedModel,
    image_files: list[str | Path],
    prompt: str,
    *,
    system: str | None = None,
    max_new_tokens: int | None = None,
) -> str:
    """The model's reply to one user turn ``prompt`` whose ``<image>`` markers stand for
    ``image_files`` in order (chat template with the generation prompt applied; KV-cache
    generation with a ``MediaBatch``).

    Raises:
        DataError: the number of images differs from the number of markers, or an image
            cannot be read.
        CaptionTooLongError: the prompt leaves no room in the row.
    """
    collator = loaded.collator
    marker = collator.image_token
    markers = prompt.count(marker) + (system or "").count(marker)
    if markers != len(image_files):
        raise DataError(
            f"the prompt has {markers} {marker} marker(s) but {len(image_files)} --image "
            f"file(s) were given; put one {marker} where each image goes, in order"
        )
    turns = [{"role": "system", "content": system}] if system else []
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    sample: dict[str, Any] = {"messages": turns, "meta": {"record": "the prompt"}}
    if image_files:
        images = [load_image(p) for p in image_files]
        sample["pixel_values"] = loaded.model.vision_encoder.preprocess(images)
    prompts = collator.prompt_batch([sample])
    room = collator.max_new_tokens(prompts["input_ids"].shape[1])
    if room < 1:
        raise CaptionTooLongError(
            f"the prompt takes {prompts['input_ids'].shape[1]} tokens (images included) but "
            f"rows hold {collator.max_length}; shorten it"
        )
    if not image_files:  # keep H, W for the encoder's zero image (FSDP-safe path)
        size = loaded.model.vision_encoder.preprocess([_blank()]).shape[1:]
        prompts["pixel_values"] = torch.zeros((0, *size))
    out = loaded.model.generate(
        to_media_batch(prompts, loaded.device),
        max_new_tokens=min(room, max_new_tokens or room),
        eos_token_id=loaded.tokenizer.eos_id,
        pad_token_id=loaded.tokenizer.pad_id,
    )
    return loaded.tokenizer.decode(out[0, prompts["input_ids"].shape[1] :].tolist())


def _blank() -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8))
