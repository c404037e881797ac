"""Write the prefix-layout reference checkpoints used by ``test_prefix_compat.py``.

Run once with the code *before* interleaved images existed (commit 458ef06): it saves,
per arch, a tiny model's weights (``<arch>.safetensors``, float32), its job config
(``<arch>.json``) and the outputs of the prefix-layout calls (``<arch>_ref.safetensors``:
``model(pixels, ids)`` logits, ``model.loss`` value, clip logits with a padded frame,
greedy ``generate`` tokens of a left-padded batch).  The test loads the weights into a
model built by the *current* code and asserts ``torch.equal`` on every output.

    python packages/vlm-strategies/tests/data/make_prefix_reference.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlm_config import JobConfig
from vlm_strategies import build_vlm

HERE = Path(__file__).parent
ARCHS = {
    "joint_decoder": {"arch": "joint_decoder"},
    "cross_attention": {"arch": "cross_attention"},
    "mot": {"arch": "mot"},
    "moma": {"arch": "moma", "experts_per_modality": 2, "expert_hidden_dim": 8},
}


def job_dict(arch: dict[str, object], frames: int) -> dict[str, object]:
    return {
        "model": {
            "dim": 16,
            "n_layers": 1,
            "n_heads": 2,
            "n_kv_heads": 1,
            "vocab_size": 32,
            "max_seq_len": 64,
            "ffn_hidden_dim": 16,
            "tie_embeddings": True,
        },
        "encoder": {"type": "random", "num_tokens": 4, "feature_dim": 8, "image_size": 8},
        "adapter": {"type": "mlp_2layer"},
        "arch": {"max_text_len": 8, "frames_per_clip": frames, **arch},
    }


def main() -> None:
    for name, arch in ARCHS.items():
        for frames in (1, 2) if name != "moma" else (1,):
            tag = name if frames == 1 else f"{name}_clip"
            job = job_dict(arch, frames)
            torch.manual_seed(0)
            model = build_vlm(JobConfig.model_validate(job))
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if not pname.startswith("vision_encoder."):
                        p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            model.eval()
            shape = (2, 3, 8, 8) if frames == 1 else (2, frames, 3, 8, 8)
            pixels = torch.randn(shape, generator=gen)
            ids = torch.randint(0, 32, (2, 6), generator=gen)
            mask = None if frames == 1 else torch.tensor([[True, False], [True, True]])
            # left padding (moma: none; its padded-row routing counts were fixed later)
            attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
            if name == "moma":
                attn = torch.ones_like(attn)
            with torch.no_grad():
                logits, _ = model(pixels, ids, frame_mask=mask)
                loss = model.loss(pixels, ids, ids, mask)
                tokens = model.generate(
                    pixels, ids, frame_mask=mask, max_new_tokens=4, attention_mask=attn
                )
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(HERE / f"{tag}.safetensors"))
            ref = {
                "pixels": pixels,
                "ids": ids,
                "attention_mask": attn,
                "logits": logits,
                "loss": loss.reshape(1),
                "generated": tokens,
            }
            if mask is not None:
                ref["frame_mask"] = mask
            save_file(ref, str(HERE / f"{tag}_ref.safetensors"))
            (HERE / f"{tag}.json").write_text(json.dumps(job, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
