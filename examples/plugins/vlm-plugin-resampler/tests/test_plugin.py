"""The plugin through the public APIs only, as an outside researcher would test it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from vlm_config import JobConfig, get_registry
from vlm_plugin_resampler import GatedCrossAttentionConfig, PerceiverResamplerConfig
from vlm_plugin_resampler.resampler import PerceiverResampler
from vlm_strategies import build_vlm, causal_lm_loss
from vlm_transformer import Transformer


def job(arch: dict[str, Any] | None = None, adapter: dict[str, Any] | None = None) -> JobConfig:
    return JobConfig.model_validate(
        {
            "model": {
                "dim": 32,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "vocab_size": 64,
                "max_seq_len": 64,
            },
            "encoder": {"type": "random", "num_tokens": 16, "feature_dim": 24, "image_size": 16},
            "adapter": adapter or {"type": "perceiver_resampler", "num_latents": 6},
            "arch": {"arch": "gated_cross_attention", "max_text_len": 12, **(arch or {})},
        }
    )


def test_registered_through_entry_points() -> None:
    reg = get_registry()
    assert reg.load("adapters", "perceiver_resampler") is PerceiverResamplerConfig
    assert reg.load("archs", "gated_cross_attention") is GatedCrossAttentionConfig
    entry = next(e for e in reg.entries("archs") if e.name == "gated_cross_attention")
    assert entry.distribution == "vlm-plugin-resampler"


@pytest.mark.parametrize("n", [1, 7, 16, 197])
def test_resampler_token_count_is_independent_of_grid(n: int) -> None:
    cfg = PerceiverResamplerConfig(num_latents=5, depth=2, num_heads=2)
    module = PerceiverResampler(cfg, in_dim=12, out_dim=8)
    out = module(torch.randn(3, n, 12))
    assert cfg.predicted_num_tokens(n) == module.output_num_tokens(n) == out.shape[1] == 5
    assert out.shape == (3, 5, 8)


def test_resampler_errors() -> None:
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide the decoder width \(8\)"):
        PerceiverResampler(PerceiverResamplerConfig(num_heads=3), 12, 8)
    module = PerceiverResampler(PerceiverResamplerConfig(num_heads=2), 12, 8)
    with pytest.raises(ValueError, match=r"\(B, N, in_dim=12\)"):
        module(torch.randn(2, 4, 11))


def test_config_fields_validated() -> None:
    with pytest.raises(ValidationError, match="every_n_layers"):
        job(arch={"every_n_layers": 0})
    with pytest.raises(ValidationError, match="gate_init"):
        job(arch={"gate_init": 9.0})
    with pytest.raises(ValidationError, match="frame positions"):
        job(arch={"frames_per_clip": 2, "frame_positions": "none"})
    assert job().sequence_budget().image_positions == 0


def test_fresh_model_equals_text_only_model() -> None:
    torch.manual_seed(0)
    model = build_vlm(job())
    text_only = Transformer(model.transformer.config)
    missing, unexpected = text_only.load_state_dict(model.transformer.state_dict(), strict=False)
    assert not missing and all(k.startswith("trunk.gated_layers.") for k in unexpected)
    ids = torch.randint(0, 64, (2, 12))
    logits, _ = model(torch.randn(2, 3, 16, 16), ids)
    torch.testing.assert_close(logits, text_only(ids), atol=1e-5, rtol=0)
    # opening the gates lets the image in
    with torch.no_grad():
        for block in model.transformer.trunk.gated_layers.values():
            block.gate_attn.fill_(1.0)
    a, _ = model(torch.randn(2, 3, 16, 16), ids)
    b, _ = model(torch.randn(2, 3, 16, 16), ids)
    assert not torch.allclose(a, b)


def test_trains_and_generates_like_full_recompute() -> None:
    torch.manual_seed(0)
    model = build_vlm(job(arch={"gate_init": 0.5}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pixels, ids = torch.randn(4, 3, 16, 16), torch.randint(0, 64, (4, 12))
    losses = []
    for _ in range(5):
        logits, labels = model(pixels, ids, labels=ids)
        loss = causal_lm_loss(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.transformer.trunk.gated_layers["0"].gate_attn.grad is not None
    model.eval()
    out = model.generate(pixels, ids[:, :3], max_new_tokens=6)
    seq = ids[:, :3]
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(pixels, seq)
            seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, seq)


def test_padded_frames_do_not_leak() -> None:
    torch.manual_seed(0)
    model = build_vlm(job(arch={"frames_per_clip": 3, "gate_init": 1.0}))
    clips, ids = torch.randn(2, 3, 3, 16, 16), torch.randint(0, 64, (2, 12))
    mask = torch.tensor([[True, True, False], [False, False, False]])
    a, _ = model(clips, ids, frame_mask=mask)
    clips[:, 2] = torch.randn(2, 3, 16, 16)
    clips[1] = torch.randn(3, 3, 16, 16)
    b, _ = model(clips, ids, frame_mask=mask)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(b).all()


def test_meta_construction_and_freeze_alias() -> None:
    from vlm_strategies import trainable_parameter_names

    cfg = job(
        arch={
            "freeze": [
                {"module": "transformer"},
                {"module": "gated_cross_attention", "frozen": False},
            ]
        }
    )
    model = build_vlm(cfg, init_device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    assert not any(p.is_meta for p in model.parameters())
    assert float(model.transformer.trunk.gated_layers["0"].gate_ffn.detach()) == 0.0
    names = trainable_parameter_names(model)
    assert {n for n in names if n.startswith("transformer.")} == {
        n for n, _ in model.named_parameters() if n.startswith("transformer.trunk.gated_layers.")
    }
