"""``vlm export RUN --format hf --out DIR`` (entry point ``export`` of ``vlm.commands``).

The register function imports no torch; the command imports it when it runs.  A model
the format cannot express, a missing run or a bad path is one ``error: ...`` line on
stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register_export"]

FORMATS = ("hf",)


def _error(message: str) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 1


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlm_config import ConfigFileError, PluginError
    from vlm_train.errors import VLMTrainError

    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        return _error(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    try:
        from vlm_train.hf_export import export_hf
        from vlm_train.inference import load_trained

        loaded = load_trained(args.run)
        folder = export_hf(
            loaded.model, loaded.job, loaded.tokenizer, out, decoder_only=args.decoder_only
        )
    except (ConfigFileError, PluginError, VLMTrainError, ValueError, OSError) as exc:
        return _error(str(exc))
    kind = "LlamaForCausalLM" if args.decoder_only else "LlavaForConditionalGeneration"
    print(f"exported {loaded.source} as {kind} to {folder}")
    return 0


def register_export(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a run, checkpoint or export folder to a Hugging Face folder",
        description=(
            "Write a folder that transformers loads with no code of ours: a joint_decoder "
            "model with a siglip/clip tower and an mlp_2layer adapter becomes "
            "LlavaForConditionalGeneration (+ processor); --decoder-only writes the "
            "decoder alone as LlamaForCausalLM (+ tokenizer)."
        ),
    )
    p.add_argument("run", help="run folder, checkpoint folder or export folder")
    p.add_argument("--format", choices=FORMATS, default="hf", help="output format (hf)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument(
        "--decoder-only", action="store_true", help="export the decoder as LlamaForCausalLM"
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=_cmd_export)
