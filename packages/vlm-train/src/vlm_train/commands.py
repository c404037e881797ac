"""``vlm train``, ``vlm eval`` and ``vlm generate`` (entry-point group ``vlm.commands``).

The ``register_*`` functions import no torch; the commands import it when they run.
Bad input (missing / corrupt / oversized image, over-long caption or prompt, unknown
config key, empty config file, a config that cannot resume its run folder or whose model
cannot be built, missing checkpoint) and failed writes (disk full) give one
``error: ...`` line on stderr and exit code 1; Ctrl-C gives ``interrupted`` and 130.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["register_eval", "register_generate", "register_train"]

_START = time.perf_counter()


def _error(message: str) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 1


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        from vlm_config import ConfigFileError, PluginError
        from vlm_config.cli import format_validation_error
        from vlm_data import DataError
        from vlm_parallel import CheckpointError
        from vlm_train.errors import VLMTrainError

        try:
            return func(args)
        except ValidationError as exc:
            where = getattr(args, "config", None) or "config"
            return _error(f"{where}: " + "; ".join(format_validation_error(exc)))
        except (ConfigFileError, PluginError, VLMTrainError, DataError, CheckpointError) as exc:
            return _error(str(exc))
        except OSError as exc:
            return _error(f"{exc}")
        except KeyboardInterrupt as exc:  # TrainingInterrupted names the saved checkpoint
            print("; ".join(["interrupted", *filter(None, [str(exc)])]), file=sys.stderr)
            return 130

    return run


@_guarded
def _cmd_train(args: argparse.Namespace) -> int:
    from vlm_config import load_job_config

    job = load_job_config(args.config, args.overrides)
    from vlm_train.errors import ConfigError
    from vlm_train.evaluate import format_eval
    from vlm_train.trainer import Trainer

    try:
        with Trainer(job) as trainer:
            result = trainer.run()
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from exc
    if result.interrupted is not None:
        return 128 + result.interrupted if result.interrupted else 0
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.eval is not None:
        for line in format_eval(result.eval):
            print(line)
    print(
        f"run folder: {result.run_dir} (metrics.jsonl, loss.png, checkpoints/, final/); "
        f"{result.step} steps; wall time {time.perf_counter() - _START:.1f}s"
    )
    return 0


@_guarded
def _cmd_eval(args: argparse.Namespace) -> int:
    from vlm_train.evaluate import evaluator_for, format_eval
    from vlm_train.inference import load_trained
    from vlm_train.sources import build_datasets

    loaded = load_trained(args.path)
    job = loaded.job
    sets = build_datasets(job, loaded.model.vision_encoder.preprocess, splits=(args.split,))
    if args.split not in sets:
        return _error(f"the job's data has no {args.split!r} split")
    dataset = sets[args.split]
    make_collator = getattr(dataset, "make_collator", None)
    collator = make_collator(loaded.tokenizer, job) if callable(make_collator) else loaded.collator
    result = evaluator_for(collator)(
        loaded.model,
        dataset,
        collator,
        batch_size=args.batch_size or job.data.eval_batch_size,
        max_samples=args.max_samples or job.data.max_eval_samples,
        device=loaded.device,
    )
    print(f"model: {loaded.source}")
    for line in format_eval(result, split=args.split):
        print(line)
    return 0


@_guarded
def _cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlm_train.data import load_image
    from vlm_train.errors import DataError
    from vlm_train.inference import caption_images, chat_generate, load_trained

    for image in args.image:  # check the inputs before loading a model
        load_image(Path(image))
    loaded = load_trained(args.checkpoint)
    if loaded.is_chat:  # trained on conversations: chat template, images at markers
        if args.prompt is None:
            raise DataError(
                "this model was trained on conversations: give the user turn with --prompt "
                "(one <image> marker per --image, in order)"
            )
        reply = chat_generate(
            loaded,
            args.image,
            args.prompt,
            system=args.system,
            max_new_tokens=args.max_new_tokens,
        )
        print(reply)
        return 0
    if args.system is not None:
        raise DataError("--system needs a model trained on conversations")
    print(caption_images(loaded, args.image, args.prompt, args.max_new_tokens))
    return 0


def register_train(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a job config (resumes from its output_dir), then print held-out accuracy",
        description="Train a VLM; run under `torchrun --nproc_per_node=N` for FSDP2.",
    )
    p.add_argument("config", help="TOML, YAML or JSON job config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.set_defaults(func=_cmd_train)


def register_eval(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="held-out loss and exact-match accuracy of a checkpoint or export"
    )
    p.add_argument("path", help="run folder, checkpoint folder or export folder")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-samples", type=int, default=None)
    p.set_defaults(func=_cmd_eval)


def register_generate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="caption an image (or a clip), or answer a chat turn with images anywhere",
        description=(
            "Prefix-trained models caption one image (or the frames of a clip). Models "
            "trained on conversations (data.type = conversation / digits_sum) answer the "
            "user turn --prompt, whose <image> markers stand for the --image files in "
            "order, through the chat template, e.g. --image a.png --image b.png "
            "--prompt '<image> and <image> : what is their sum ?'"
        ),
    )
    p.add_argument("checkpoint", help="run folder, checkpoint folder or export folder")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        help="PNG/JPEG file; repeat for the frames of a clip, or for each <image> marker",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help="text before the caption (default: the job's), or the user turn of a chat model",
    )
    p.add_argument("--system", default=None, help="a system turn (chat models only)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.set_defaults(func=_cmd_generate)
