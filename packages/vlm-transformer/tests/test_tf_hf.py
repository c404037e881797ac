from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_transformer import ModalityContext, Transformer, generate
from vlm_transformer.hf import (
    config_from_hf,
    from_hf_state_dict,
    load_hf_llama,
    save_hf_llama,
    to_hf_config,
)

transformers = pytest.importorskip("transformers")


def _hf_llama(tmp: Path, *, kv_heads: int, tied: bool, seed: int = 0) -> tuple[Path, object]:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=128,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=5000.0,
        tie_word_embeddings=tied,
        initializer_range=0.15,  # logits of order 1, so mistakes are visible
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp)
    return tmp, model


@pytest.mark.parametrize(("kv_heads", "tied"), [(2, False), (1, True), (4, True)])
def test_logits_parity(tmp_path: Path, kv_heads: int, tied: bool) -> None:
    folder, hf = _hf_llama(tmp_path, kv_heads=kv_heads, tied=tied)
    ours = load_hf_llama(folder).eval()
    assert ours.config.kv_heads == kv_heads
    assert ours.config.tie_embeddings == tied
    assert ours.config.norm_eps == 1e-6
    assert ours.config.rope_theta == 5000.0
    ids = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert ref.abs().max() > 1.0
    diff = (got - ref).abs().max().item()
    print(f"\n[parity] kv_heads={kv_heads} tied={tied}: max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4
    # left-padded batch, with HF's generation-style position ids
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :5] = 0
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, ModalityContext(key_padding_mask=mask.bool()))
    real = mask.bool()
    diff = (got[real] - ref[real]).abs().max().item()
    print(f"[parity] left-padded batch: max |logit diff| over real tokens = {diff:.3e}")
    assert diff <= 1e-4


def test_generation_matches_hf(tmp_path: Path) -> None:
    folder, hf = _hf_llama(tmp_path, kv_heads=2, tied=False)
    ours = load_hf_llama(folder).eval()
    ids = torch.randint(0, 128, (2, 6))
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(ours, ids, max_new_tokens=8), ref)


def test_export_round_trip(tmp_path: Path) -> None:
    folder, hf = _hf_llama(tmp_path / "src", kv_heads=2, tied=False)
    ours = load_hf_llama(folder)
    out = save_hf_llama(ours, tmp_path / "out")
    original = load_file(str(folder / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert set(original) == set(exported)
    for k, v in original.items():
        assert torch.equal(v, exported[k]), k
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(load_hf_llama(out)(ids), ours(ids), rtol=0, atol=0)
    # a freshly initialised model of ours exports to something HF loads identically
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    mine = Transformer(cfg)
    mine.init_weights()
    save_hf_llama(mine, tmp_path / "mine")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "mine").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, mine(ids), atol=1e-4, rtol=1e-4)
    hf_cfg = to_hf_config(cfg)
    assert hf_cfg.num_key_value_heads == 2
    assert hf_cfg.intermediate_size == 96


def test_tied_export(tmp_path: Path) -> None:
    folder, hf = _hf_llama(tmp_path / "src", kv_heads=1, tied=True)
    out = save_hf_llama(load_hf_llama(folder), tmp_path / "out")
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-6)


def test_bad_weights_are_listed(tmp_path: Path) -> None:
    folder, _ = _hf_llama(tmp_path, kv_heads=2, tied=False)
    state = load_file(str(folder / "model.safetensors"))
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.extra.weight"] = torch.zeros(1)
    broken["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, 64)
    with pytest.raises(ValueError) as err:
        from_hf_state_dict(broken, cfg)
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.extra.weight" in msg
    assert "k_proj.weight: expected (32, 64), got (5, 64)" in msg
    save_file(broken, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_hf_llama(folder)


def test_unsupported_configs() -> None:
    base = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 10,
        "intermediate_size": 8,
    }
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="rope"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**base, "model_type": "qwen2"})
