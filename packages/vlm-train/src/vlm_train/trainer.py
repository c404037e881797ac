"""The :class:`Trainer`: one process, or many under ``torchrun`` (FSDP2 via vlm-parallel).

The CLI (``vlm train``), :func:`vlm_train.train`, the tests and the benchmark all drive
this class, so the benchmarked step is the step users run::

    with Trainer(job) as trainer:          # setup() ... close()
        while trainer.global_step < job.train.steps:
            trainer.step()
        trainer.checkpoint()
        result = trainer.finish()

Per optimiser step: the step's global batch (:class:`GlobalBatchSampler`) is split into
``grad_accum_steps`` micro-batches, each sharded over ranks and read, decoded and
augmented by the ``DataLoader`` workers of :func:`vlm_data.train_loader`
(``data.num_workers``; augmentation seeded by (seed, sample, epoch), so any world size
sees the same pixels); loss = causal LM loss (LM head fused with the cross-entropy) +
weighted trunk auxiliary losses; gradients are clipped, AdamW steps, the warmup+cosine
schedule advances.  Freeze-schedule stages switch the trainable set at step boundaries.

Resuming never damages a run folder: the config is compared with the run's saved
``job.toml`` before anything is written (:func:`resume_differences`); only the fields in
:data:`SAFE_RESUME_FIELDS` may differ, and ``job.toml`` is rewritten only after the
checkpoint loaded.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_config import JobConfig, load_job_config, write_toml
from vlm_data import (
    Batch,
    GlobalBatchSampler,
    ImageTextCollator,
    StreamingDataset,
    raise_batch_error,
    train_loader,
)
from vlm_data.tokenizer import TextTokenizer, pretrained_tokenizer
from vlm_strategies import VLMWrapper, apply_freeze, freeze_specs_at
from vlm_train.errors import ConfigError, TrainingInterrupted, VLMTrainError
from vlm_train.evaluate import EvalResult, evaluator_for, format_eval
from vlm_train.feature_cache import TrainFeatureCache, model_images
from vlm_train.plot import plot_loss_curve, read_metrics
from vlm_train.schedule import lr_factor
from vlm_train.sources import build_datasets, build_tokenizer

__all__ = [
    "SAFE_RESUME_FIELDS",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "resume_differences",
]

#: Config fields that may differ from a run's saved ``job.toml`` when resuming it: none
#: changes the shape of the model or optimizer state, the training data or its order.
#: (``train.steps`` moves the end of the cosine schedule; world-size and memory/speed
#: settings re-shard the same state.)  Any other difference stops the resume.
SAFE_RESUME_FIELDS: frozenset[str] = frozenset(
    {
        "name",
        "train.steps",
        "train.log_every",
        "train.eval_every",
        "train.eval_at_end",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.progress",
        "train.num_threads",
        "train.feature_cache",
        "train.feature_cache_dir",
        "train.export",
        "train.output_dir",
        "train.resume",
        "data.max_eval_samples",
        "data.eval_batch_size",
        "data.num_workers",
        "data.prefetch_factor",
        "parallel.dp_shard",
        "parallel.dp_replicate",
        "parallel.activation_checkpointing",
        "parallel.compile",
        "parallel.reshard_after_forward",
    }
)


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        run_dir: the run folder (``train.output_dir``).
        step: optimiser steps completed (== ``train.steps`` unless interrupted).
        resumed_from: the checkpoint step this call started from, or ``None``.
        interrupted: the signal number that stopped the run, ``0`` for
            ``stop_after_steps``, or ``None`` when it ran to the end.
        eval: held-out result at the end (``None`` when interrupted or disabled).
        elapsed_s: wall time of this call.
        final_loss: the last step's training loss (``None`` when no step ran).
    """

    run_dir: Path
    step: int
    resumed_from: int | None
    interrupted: int | None
    eval: EvalResult | None
    elapsed_s: float
    final_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------- optimizer
def build_optimizer(model: nn.Module, job: JobConfig) -> torch.optim.Optimizer:
    """AdamW over every parameter (frozen ones get no gradient and stay untouched, and
    may be unfrozen later by the freeze schedule); no weight decay on 1-D parameters.

    The implementation is ``fused=True`` on every device (CPU fused AdamW exists since
    torch 2.4): on CPU its ``step()`` took 0.7 ms against 7.1 ms for ``foreach`` on the
    digits example model, it trains FSDP2's DTensor parameters on CPU/gloo (the
    2-process test), and PyTorch documents it as the fastest on CUDA.
    """
    cfg = job.train
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, fused=True
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, job: JobConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay (:func:`lr_factor`) over ``train.steps``."""
    cfg = job.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio
        ),
    )


# -------------------------------------------------------------------------- resume
#: what a run writes in its ``train.output_dir`` (set aside by ``train.resume = false``)
RUN_FILES = (
    "checkpoints",
    "final",
    "job.toml",
    "tokenizer.json",
    "tokenizer_config.json",
    "metrics.jsonl",
    "eval.json",
    "loss.png",
)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _show(value: Any) -> str:
    return "unset" if value is _UNSET else json.dumps(value)


_UNSET = object()


def resume_differences(saved: JobConfig, new: JobConfig) -> tuple[list[str], list[str]]:
    """Compare a run's saved config with the config that would resume it.

    Returns:
        ``(unsafe, safe)``: lines ``"model.dim: 32 (run) vs 64 (this config)"`` for the
        differing fields outside :data:`SAFE_RESUME_FIELDS` and inside it, sorted by
        field path.  Both are empty when the configs are equal.
    """
    old = _flatten(saved.model_dump(mode="json"))
    cur = _flatten(new.model_dump(mode="json"))
    unsafe: list[str] = []
    safe: list[str] = []
    for key in sorted(old.keys() | cur.keys()):
        a, b = old.get(key, _UNSET), cur.get(key, _UNSET)
        if a != b:
            line = f"{key}: {_show(a)} (run) vs {_show(b)} (this config)"
            (safe if key in SAFE_RESUME_FIELDS else unsafe).append(line)
    return unsafe, safe


def _read_saved_job(path: Path) -> JobConfig:
    from pydantic import ValidationError

    from vlm_config import ConfigFileError

    try:
        return load_job_config(path)
    except (ConfigFileError, ValidationError) as exc:
        raise ConfigError(
            f"cannot resume {path.parent}: its saved {path.name} cannot be read ({exc}); "
            "use a new train.output_dir or train.resume=false to start afresh"
        ) from exc


# -------------------------------------------------------------------------- signals
class _StopFlag:
    """SIGTERM / SIGINT -> stop at the next step boundary (handlers restored on exit).

    A second SIGINT stops at once (``KeyboardInterrupt``), except inside
    :meth:`saving`: there it is deferred, and :meth:`raise_deferred` raises
    :class:`TrainingInterrupted` once the checkpoint is complete.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saving = False
        self._deferred = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            if self._saving:
                self._deferred = True
                return
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Defer a second Ctrl-C until the block (a checkpoint save) has finished."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def raise_deferred(self, checkpoint: Path) -> None:
        """Raise the Ctrl-C deferred by :meth:`saving`, naming the complete checkpoint."""
        if self._deferred:
            self._deferred = False
            raise TrainingInterrupted(f"checkpoint {checkpoint.name} is complete")

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class _Metrics:
    """metrics.jsonl on the main rank (records past the resume step dropped)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            kept = [r for r in kept if not (r.get("kind") == "eval" and r.get("final"))]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            tmp.replace(path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _short(result: EvalResult) -> dict[str, Any]:
    d = result.to_dict()
    d.pop("examples", None)
    return d


# -------------------------------------------------------------------------- trainer
class Trainer:
    """Train one job: :meth:`setup`, then :meth:`step` / :meth:`checkpoint` /
    :meth:`evaluate`, then :meth:`finish`; :meth:`close` releases the process group.

    Every rank of a ``torchrun`` job drives its own ``Trainer`` with the same config
    and the same calls (each method is collective).  ``with Trainer(job) as t`` calls
    :meth:`setup` and, on exit, :meth:`close`; :meth:`run` is the whole loop.

    Invariants after :meth:`setup`: ``global_step`` is the number of optimiser steps
    done (the resumed checkpoint's step at first); the run folder holds this config's
    ``job.toml`` and ``tokenizer.json``; nothing in an existing run folder was written
    before its checkpoint loaded.

    Args:
        job: the validated job config.
        log: where the main rank's messages go.
    """

    def __init__(self, job: JobConfig, *, log: Callable[[str], None] = print) -> None:
        self.job = job
        self._log = log
        self.global_step = 0
        self.resumed_from: int | None = None
        self.last_loss: float | None = None
        self.run_dir = Path(job.train.output_dir)
        self._safe_changes: list[str] = []
        self._stop: _StopFlag | None = None
        self._bar: Any = None
        self._t0 = time.perf_counter()
        self._window = {"loss": 0.0, "n": 0, "tokens": 0, "t": time.perf_counter()}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Trainer:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def say(self, message: str) -> None:
        """Log ``message`` on the main rank only."""
        if self.dist.is_main:
            self._log(message)

    def setup(self) -> None:
        """Initialise the process group, check a resume, build model, data, optimizer and
        schedule, restore the latest checkpoint, then write the run files.

        Raises:
            ConfigError: the config cannot resume the run in its ``output_dir`` (fields
                outside :data:`SAFE_RESUME_FIELDS` differ), or its model cannot be built
                (a ``ValueError`` of a component builder).
            VLMTrainError: the batch does not shard over the ranks; data problems.
        """
        from vlm_parallel import init_distributed

        self._t0 = time.perf_counter()
        if self.job.train.num_threads is not None:
            torch.set_num_threads(self.job.train.num_threads)
        self.dist = init_distributed(self.job.parallel)
        self._check_world()
        self._ckpt = self._checkpoints()
        resume_point = self._resume_point()
        self.model = self._build_model()
        if not self.job.train.resume:
            self._set_aside_earlier_run()
        self._build_data(resuming=resume_point is not None)
        self.optimizer = build_optimizer(self.model, self.job)
        self.scheduler = build_scheduler(self.optimizer, self.job)
        self._restore(resume_point)
        self._write_run_files()
        self._announce()

    def close(self) -> None:
        """Close the progress bar and destroy the process group (if any)."""
        from vlm_parallel import destroy_distributed

        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if hasattr(self, "_loader"):
            self._close_loader()
        destroy_distributed()

    # --------------------------------------------------------------------- setup
    def _check_world(self) -> None:
        cfg, world = self.job.train, self.dist.world_size
        micro_global = cfg.batch_size // cfg.grad_accum_steps
        if micro_global % world:
            raise VLMTrainError(
                f"train.batch_size / grad_accum_steps = {micro_global} is not divisible by "
                f"the world size {world}"
            )

    def _checkpoints(self) -> Any:
        from vlm_parallel import CheckpointManager

        cfg = self.job.train
        return CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.keep_checkpoints)

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume from (``None``: a fresh run), after checking that
        this config may resume the run (reads only; every rank checks)."""
        latest: Path | None = self._ckpt.latest() if self.job.train.resume else None
        saved = self.run_dir / "job.toml"
        if latest is None or not saved.is_file():
            return latest
        unsafe, self._safe_changes = resume_differences(_read_saved_job(saved), self.job)
        if unsafe:
            raise ConfigError(
                f"cannot resume {self.run_dir}: this config differs from the run's "
                f"{saved.name} in {len(unsafe)} field(s) that change the model, its "
                f"optimizer state or the data: {'; '.join(unsafe)}; use a new "
                "train.output_dir or train.resume=false to start afresh"
            )
        return latest

    def _set_aside_earlier_run(self) -> None:
        """``train.resume = false`` in a folder that holds an earlier run: its files
        (:data:`RUN_FILES`) move to ``earlier_runs/<UTC time>/`` before anything is written,
        so the new run's checkpoints never mix with the old ones (a later resume would
        otherwise pick the old run's newest step) and nothing is deleted.  The feature
        cache stays (it is keyed by content)."""
        from vlm_parallel import barrier

        if self.dist.is_main:
            found = [self.run_dir / name for name in RUN_FILES if (self.run_dir / name).exists()]
            if found:
                stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
                dest = self.run_dir / "earlier_runs" / stamp
                n = 1
                while dest.exists():
                    n += 1
                    dest = self.run_dir / "earlier_runs" / f"{stamp}-{n}"
                dest.mkdir(parents=True)
                for path in found:
                    path.rename(dest / path.name)
                names = ", ".join(p.name for p in found)
                self.say(f"train.resume=false: moved the earlier run's {names} to {dest}")
        barrier()

    def _build_model(self) -> VLMWrapper:
        from vlm_parallel import build_parallel_vlm

        torch.manual_seed(self.job.train.seed)
        try:
            return build_parallel_vlm(self.job, self.dist, self.job.train.seed)
        except ValueError as exc:
            if isinstance(exc, VLMTrainError):
                raise
            raise ConfigError(f"cannot build the model: {exc}") from exc

    def _build_data(self, *, resuming: bool) -> None:
        """Datasets, tokeniser, collator, the global-batch sampler and the loader."""
        job = self.job
        datasets = build_datasets(job, self.model.vision_encoder.preprocess)
        self.train_set, self.test_set = datasets["train"], datasets.get("test")
        self.tokenizer = self._tokenizer(resuming=resuming)
        self.collator = ImageTextCollator(self.tokenizer, job.arch.max_text_len)
        make_collator = getattr(self.train_set, "make_collator", None)
        if callable(make_collator):  # conversations: chat template, images anywhere
            if job.data.packing:
                raise ConfigError(f"data.packing does not take the {job.data.type!r} dataset")
            self.collator = make_collator(self.tokenizer, job)
        self.train_collator: Any = self.collator
        if job.data.packing:  # training rows pack several samples; evaluation does not
            from vlm_data import PackingCollator
            from vlm_strategies import placeholders_per_image

            positions = getattr(self.model, "num_image_positions", 0)
            self.train_collator = PackingCollator(
                self.collator,
                row_length=job.data.packed_length or job.model.max_seq_len,
                placeholders_per_image=placeholders_per_image(positions),
            )
        if getattr(self.train_set, "captions_known", False):
            # fail before the first step on captions that do not fit (no decoding needed)
            for caption in set(self.train_set.captions()):
                self.collator.encode(job.data.prompt, caption)
        self.sampler: GlobalBatchSampler | None = None
        if not isinstance(self.train_set, StreamingDataset):
            lengths = getattr(self.train_set, "lengths", None)
            self.sampler = GlobalBatchSampler(
                len(self.train_set),
                job.train.batch_size,
                seed=job.train.seed,
                lengths=lengths() if callable(lengths) else None,
                curriculum_steps=getattr(self.train_set, "curriculum_steps", 0),
            )
        self._loader: Any = None
        self._batches: Iterator[Batch] | None = None
        self._loader_step = -1
        self._skipped = 0
        self._positions = getattr(self.model, "num_image_positions", 0) + job.arch.max_text_len
        self._features = TrainFeatureCache(job, self.model, self.train_set, self.dist, self.say)

    def _make_loader(self, start_step: int) -> Any:
        cfg, data = self.job.train, self.job.data
        micro = cfg.batch_size // cfg.grad_accum_steps // self.dist.world_size
        # a frozen encoder's features come from the feature cache when it is on
        dataset, collator = self._features.loader_inputs(self.train_set, self.train_collator)
        return train_loader(
            dataset,
            collator,
            self.sampler,
            num_micro=cfg.grad_accum_steps,
            micro_batch=micro,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            start_step=start_step,
            end_step=max(cfg.steps, start_step + 1),
            seed=cfg.seed,
            num_workers=data.num_workers,
            prefetch_factor=data.prefetch_factor,
            on_bad_sample=data.on_bad_sample,
            pin_memory=self.dist.device.type == "cuda",
        )

    def _stream_at(self, step: int) -> Iterator[Batch]:
        """The loader's batches from ``step`` on (the loader is built once and its
        persistent workers reused; a streaming dataset's loader is rebuilt)."""
        if self._loader is None or self.sampler is None:
            self._close_loader()
            self._loader = self._make_loader(step)
        else:
            self._loader.batch_sampler.start_step = step
            self._loader.batch_sampler.end_step = max(self.job.train.steps, step + 1)
        self._loader_step = step
        return iter(self._loader)

    def _close_loader(self) -> None:
        self._batches = None
        if self._loader is not None:
            iterator = getattr(self._loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            self._loader = None

    def _tokenizer(self, *, resuming: bool) -> TextTokenizer:
        """The main rank reuses the run's ``tokenizer.json`` when resuming, else builds
        one and saves it (the only write before a checkpoint loads, and only for a fresh
        run); the other ranks then load the saved file.  With ``model.pretrained`` and no
        ``data.tokenizer`` every rank reads the folder's own tokenizer instead (like
        ``data.tokenizer``: its ``tokenizer_config.json`` names the special tokens)."""
        from vlm_parallel import barrier

        job = self.job
        folder = job.model.pretrained if job.data.tokenizer is None else None
        tok_path = self.run_dir / "tokenizer.json"
        tokenizer: TextTokenizer | None = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            reuse = resuming and tok_path.is_file()
            saved = tok_path if reuse else None
            if folder is not None:
                tokenizer = pretrained_tokenizer(folder, job.model.vocab_size)
            else:
                tokenizer = build_tokenizer(job, self.train_set, saved=saved)
            if not reuse:
                tokenizer.save(tok_path)
        barrier()
        if tokenizer is None:
            if folder is not None:
                tokenizer = pretrained_tokenizer(folder, job.model.vocab_size)
            else:
                tokenizer = build_tokenizer(job, None, saved=tok_path)
        return tokenizer

    def _restore(self, resume_point: Path | None) -> None:
        """Load the newest readable checkpoint (an unreadable newer one is skipped with
        a warning) and apply the freeze stage of its step."""
        if resume_point is not None:
            state = self._load_latest()
            if state is not None:
                self.global_step = self.resumed_from = int(state["step"])
                steps = self.job.train.steps
                self.say(f"resumed from {state['path']} (step {self.global_step}/{steps})")
                if self._safe_changes:
                    self.say(
                        "warning: resuming with settings that differ from the run's "
                        f"job.toml (applied): {'; '.join(self._safe_changes)}"
                    )
        self._stage = freeze_specs_at(self.job.arch, self.global_step)
        if self.global_step:
            apply_freeze(self.model, self.job.arch, self.global_step)

    def _load_latest(self) -> dict[str, Any] | None:
        from vlm_parallel import CheckpointError

        try:
            state: dict[str, Any] | None = self._ckpt.load_latest(
                self.model, self.optimizer, self.scheduler, warn=self.say
            )
        except CheckpointError as exc:
            raise VLMTrainError(
                f"cannot resume {self.run_dir}: {exc}; use a new train.output_dir or "
                "train.resume=false to start afresh"
            ) from exc
        return state

    def _write_run_files(self) -> None:
        from vlm_parallel import barrier

        if self.dist.is_main:
            write_toml(self.job, self.run_dir / "job.toml")
        self.metrics = _Metrics(self.run_dir / "metrics.jsonl", self.dist.is_main, self.global_step)
        barrier()

    def _announce(self) -> None:
        cfg = self.job.train
        n_params = sum(p.numel() for p in self.model.parameters())
        self.say(
            f"training {self.job.name}: arch={self.job.arch.arch} params={n_params / 1e6:.2f}M "
            f"train={len(self.train_set)} test={len(self.test_set) if self.test_set else 0} "
            f"world={self.dist.world_size} steps={cfg.steps} batch={cfg.batch_size}"
        )
        if self.dist.is_main and cfg.progress and self.global_step < cfg.steps:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=cfg.steps,
                initial=self.global_step,
                desc="train",
                dynamic_ncols=True,
                mininterval=1.0,
            )
        self.model.train()
        self._window["t"] = time.perf_counter()

    # ---------------------------------------------------------------------- step
    def next_batches(self) -> list[Batch]:
        """This rank's ``grad_accum_steps`` micro-batches of the next step, from the
        ``DataLoader`` (restarted at ``global_step`` whenever steps were fed from
        elsewhere, e.g. :meth:`step` with explicit batches)."""
        accum = self.job.train.grad_accum_steps
        if self._batches is None or self._loader_step != self.global_step:
            self._batches = self._stream_at(self.global_step)
        out = []
        for _ in range(accum):
            try:
                out.append(next(self._batches))
            except StopIteration:  # past train.steps (the caller steps on): restart
                self._batches = self._stream_at(self.global_step)
                out.append(next(self._batches))
            raise_batch_error(out[-1])
        self._loader_step = self.global_step + 1
        return out

    def step(self, batches: Sequence[Batch] | None = None) -> float:
        """One optimiser step; returns its training loss (mean over micro-batches).

        Args:
            batches: this rank's ``grad_accum_steps`` micro-batches; default
                :meth:`next_batches` (the training data).  The benchmark passes fixed
                batches so that every model sees the same inputs.

        Raises:
            ValueError: ``batches`` does not hold ``grad_accum_steps`` batches.
            VLMTrainError: the loss is not finite.
        """
        accum = self.job.train.grad_accum_steps
        if batches is None:
            batches = self.next_batches()
        elif len(batches) != accum:
            raise ValueError(f"step() needs {accum} micro-batches, got {len(batches)}")
        self._apply_freeze_stage()
        self._count_skipped(batches)
        loss, aux = self._forward_backward(batches)
        self._optimizer_step()
        self.global_step += 1
        self.last_loss = loss
        tokens = sum(self._batch_positions(b) for b in batches)
        self._record(loss, aux, tokens * self.dist.world_size)
        return loss

    def _batch_positions(self, batch: Batch) -> int:
        """Positions (padding included) a micro-batch runs through the decoder."""
        if "sequence_ids" in batch:  # packed rows (vlm_data.PackingCollator)
            return int(batch["input_ids"].numel())
        return int(batch["input_ids"].shape[0]) * self._positions

    def _count_skipped(self, batches: Sequence[Batch]) -> None:
        """Log the samples ``on_bad_sample = "skip"`` replaced in this rank's batches."""
        for batch in batches:
            for message in batch.get("skipped", []):
                self._skipped += 1
                self._log(
                    f"rank {self.dist.rank} step {self.global_step}: skipped a bad sample "
                    f"({self._skipped} so far): {message}"
                )

    @property
    def skipped_samples(self) -> int:
        """Bad samples this rank skipped so far (``data.on_bad_sample = "skip"``)."""
        return self._skipped

    def _apply_freeze_stage(self) -> None:
        stage = freeze_specs_at(self.job.arch, self.global_step)
        if stage != self._stage:
            apply_freeze(self.model, self.job.arch, self.global_step)
            self._stage = stage
            self.say(f"step {self.global_step}: freeze schedule stage applied")

    def _autocast(self) -> Any:
        if self.job.train.autocast_bf16:
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_backward(self, batches: Sequence[Batch]) -> tuple[float, dict[str, float]]:
        cfg, device = self.job.train, self.dist.device
        step_loss = 0.0
        aux_logged: dict[str, float] = {}
        for batch in batches:
            frame_mask = batch["frame_mask"]
            image_mask = batch.get("image_mask")
            with self._autocast():
                # LM head fused with the cross-entropy: no (B, S, V) logits held
                if "sequence_ids" in batch:
                    # packed rows: mean over the same non-ignored tokens as unpacked
                    loss = self.model.loss(self._packed_batch(batch, device))
                elif image_mask is not None and not bool(image_mask.all()):
                    # text-only samples: images anywhere (0 or 1 image per row)
                    media = self._media_batch(batch, image_mask, device)
                    loss = self.model.loss(media)
                else:
                    loss = self.model.loss(
                        model_images(batch, device),  # pixels, or cached features
                        batch["input_ids"].to(device),
                        batch["labels"].to(device),
                        None if frame_mask is None else frame_mask.to(device),
                    )
                total = loss
                for name, value in self.model.auxiliary_losses().items():
                    weight = cfg.aux_loss_weights.get(name, 1.0)
                    if weight:
                        total = total + weight * value.float()
                    aux_logged[name] = aux_logged.get(name, 0.0) + float(value.detach())
            (total / len(batches)).backward()
            step_loss += float(loss.detach()) / len(batches)
        if not math.isfinite(step_loss):
            raise VLMTrainError(f"the loss became {step_loss} at step {self.global_step}")
        return step_loss, {k: v / len(batches) for k, v in aux_logged.items()}

    @staticmethod
    def _packed_batch(batch: Any, device: torch.device) -> Any:
        """A :class:`vlm_data.PackedBatch` as a ``vlm_strategies.MediaBatch``."""
        from vlm_data.packing import MEDIA_FIELDS
        from vlm_strategies import MediaBatch

        fields = {k: batch[k] for k in MEDIA_FIELDS}
        for key, value in fields.items():
            if isinstance(value, torch.Tensor):
                fields[key] = value.to(device)
        return MediaBatch(**fields)

    def _media_batch(self, batch: Batch, image_mask: torch.Tensor, device: torch.device) -> Any:
        """A prefix-layout batch with text-only rows as a ``vlm_strategies.MediaBatch``:
        an image row is ``[placeholders] text``, a text-only row is ``text [padding]``;
        only the rows with an image contribute pixels (``image_sample_index``)."""
        from vlm_strategies import MediaBatch, placeholders_per_image

        k = placeholders_per_image(getattr(self.model, "num_image_positions", 0))
        ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
        rows, width = ids.shape
        new_ids = torch.full((rows, k + width), self.tokenizer.pad_id, dtype=torch.long)
        new_labels = torch.full_like(new_ids, -100)
        new_attn = torch.zeros((rows, k + width), dtype=torch.bool)
        placeholder = torch.zeros((rows, k + width), dtype=torch.bool)
        for row, has_image in enumerate(image_mask.tolist()):
            start = k if has_image else 0
            new_ids[row, start : start + width] = ids[row]
            new_labels[row, start : start + width] = labels[row]
            new_attn[row, start : start + width] = attn[row]
            if has_image:
                new_attn[row, :k] = True
                placeholder[row, :k] = True
        frame_mask = batch["frame_mask"]
        return MediaBatch(
            input_ids=new_ids.to(device),
            image_token_id=self.tokenizer.pad_id,
            pixel_values=batch["pixel_values"][image_mask].to(device),
            image_sample_index=torch.nonzero(image_mask).flatten().to(device),
            frame_mask=None if frame_mask is None else frame_mask[image_mask].to(device),
            attention_mask=new_attn.to(device),
            labels=new_labels.to(device),
            placeholder_mask=placeholder.to(device),
        )

    def _optimizer_step(self) -> None:
        clip = self.job.train.grad_clip
        if clip is not None:
            trainable = [p for p in self.model.parameters() if p.grad is not None]
            if trainable:
                torch.nn.utils.clip_grad_norm_(trainable, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _record(self, loss: float, aux: dict[str, float], tokens: int) -> None:
        """Accumulate the logging window; every ``log_every`` steps (and at the last)
        write a metrics record averaged over ranks and refresh the progress bar."""
        from vlm_parallel import all_reduce_sum

        cfg, w = self.job.train, self._window
        w["loss"] += loss
        w["n"] += 1
        w["tokens"] += tokens
        if self.global_step % cfg.log_every == 0 or self.global_step == cfg.steps:
            total, skipped = all_reduce_sum([w["loss"] / w["n"], float(self._skipped)])
            avg = total / self.dist.world_size
            dt = max(time.perf_counter() - w["t"], 1e-9)
            lr = self.optimizer.param_groups[0]["lr"]
            record: dict[str, Any] = {
                "kind": "train",
                "step": self.global_step,
                "loss": avg,
                "lr": lr,
                "tokens_per_s": w["tokens"] / dt,
                "time_s": time.perf_counter() - self._t0,
            }
            if aux:
                record["aux"] = aux
            if skipped:
                record["skipped_samples"] = int(skipped)
            self.metrics.write(record)
            if self._bar is not None:
                tok_s = f"{w['tokens'] / dt:.0f}"
                self._bar.set_postfix(loss=f"{avg:.4f}", tok_s=tok_s, lr=f"{lr:.2e}", refresh=False)
            self._window = {"loss": 0.0, "n": 0, "tokens": 0, "t": time.perf_counter()}
        if self._bar is not None:
            self._bar.update(1)

    # ---------------------------------------------------------------- checkpoint
    def checkpoint(self) -> Path:
        """Save a checkpoint of the current step (collective); returns its folder.

        A second Ctrl-C during the save is deferred until the checkpoint is complete,
        then raised as :class:`TrainingInterrupted`.

        Raises:
            OSError: the save failed (e.g. the disk is full); the previous checkpoint
                stays the resume point.
        """
        stop = self._stop if self._stop is not None else _StopFlag()
        with stop.saving():
            path: Path = self._ckpt.save(
                self.global_step,
                self.model,
                self.optimizer,
                self.scheduler,
                extra={"loss": self.last_loss},
            )
        stop.raise_deferred(path)
        return path

    # ---------------------------------------------------------------------- eval
    def evaluate(self) -> EvalResult | None:
        """Held-out loss and exact-match accuracy (collective); ``None`` without a test
        split.  Leaves the model in training mode."""
        if self.test_set is None:
            return None
        return evaluator_for(self.collator)(
            self.model,
            self.test_set,
            self.collator,
            batch_size=self.job.data.eval_batch_size,
            max_samples=self.job.data.max_eval_samples,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            device=self.dist.device,
            autocast_bf16=self.job.train.autocast_bf16,
        )

    # ----------------------------------------------------------------------- run
    def run(self, stop_after_steps: int | None = None) -> TrainResult:
        """Train to ``train.steps`` with periodic checkpoints and evaluations, save the
        last checkpoint, then :meth:`finish`.  SIGTERM / Ctrl-C save a checkpoint at the
        next step boundary and return early (``interrupted`` = the signal number).

        Args:
            stop_after_steps: run at most this many steps in this call, then save a
                checkpoint and return as if interrupted (``interrupted == 0``); for
                time-sliced jobs and resume tests.
        """
        start = self.global_step
        with _StopFlag() as self._stop:
            try:
                stopped = self._loop(start, stop_after_steps)
                if stopped is None and start < self.job.train.steps:
                    self.checkpoint()
            finally:
                self._stop = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if stopped is not None:
            return self._stopped(stopped)
        return self.finish()

    def _loop(self, start: int, stop_after_steps: int | None) -> int | None:
        """Steps until the end or a stop; returns the stop reason (signal, 0) or None."""
        from vlm_parallel import all_reduce_max

        cfg = self.job.train
        assert self._stop is not None
        while self.global_step < cfg.steps:
            self.step()
            step = self.global_step
            stop = all_reduce_max(self._stop.signum or 0)
            if not stop and stop_after_steps is not None and step - start >= stop_after_steps:
                stop = -1 if step < cfg.steps else 0
            periodic = cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0
            if stop or (periodic and step < cfg.steps):
                self.checkpoint()
            if stop:
                return max(stop, 0)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                self._interim_eval()
        return None

    def _interim_eval(self) -> None:
        result = self.evaluate()
        if result is not None:
            self.metrics.write({"kind": "eval", "step": self.global_step, **_short(result)})
            self.say(f"step {self.global_step}: " + format_eval(result)[0])

    def _stopped(self, reason: int) -> TrainResult:
        why = f"signal {reason}" if reason else "stop_after_steps"
        self.say(
            f"stopped by {why} at step {self.global_step}/{self.job.train.steps}; checkpoint "
            f"saved in {self.run_dir / 'checkpoints'}; "
            + (
                "rerun the same command to resume"
                if self.job.train.resume
                else "rerun it with train.resume=true to resume (with false it starts afresh)"
            )
        )
        return self._result(reason, None)

    def _result(self, interrupted: int | None, result: EvalResult | None) -> TrainResult:
        elapsed = time.perf_counter() - self._t0
        return TrainResult(
            self.run_dir,
            self.global_step,
            self.resumed_from,
            interrupted,
            result,
            elapsed,
            self.last_loss,
        )

    # -------------------------------------------------------------------- finish
    def finish(self) -> TrainResult:
        """The end of a run: final held-out evaluation (``eval.json``), consolidated
        export (``final/``) and the loss plot (``loss.png``); collective."""
        from vlm_parallel import barrier, export_consolidated

        cfg = self.job.train
        result = self.evaluate() if cfg.eval_at_end else None
        if result is not None:
            record = {"kind": "eval", "step": self.global_step, "final": True, **_short(result)}
            self.metrics.write(record)
            if self.dist.is_main:
                (self.run_dir / "eval.json").write_text(
                    json.dumps({"step": self.global_step, **result.to_dict()}, indent=2),
                    encoding="utf-8",
                )
        if cfg.export:
            export_consolidated(self.model, self.job, self.run_dir / "final")
            if self.dist.is_main:
                self.tokenizer.save(self.run_dir / "final" / "tokenizer.json")
        if self.dist.is_main:
            self._plot()
        barrier()
        return self._result(None, result)

    def _plot(self) -> None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            self.say(
                "loss.png not written: matplotlib is not installed (pip install 'vlm-train[plot]')"
            )
            return
        try:
            plot_loss_curve(
                self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", title=self.job.name
            )
        except Exception as exc:  # a plotting problem must not lose a finished run
            self.say(f"warning: could not plot the loss curve: {exc}")
