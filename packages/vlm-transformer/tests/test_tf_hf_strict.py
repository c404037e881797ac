"""Strict Hugging Face decoder loading: tied/untied heads decided by the weights,
Mistral, rejected architectures, config/weight mismatches as one clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_config import ModelConfig
from vlm_config.model import resolve_hf_tie
from vlm_transformer import Transformer
from vlm_transformer.hf import (
    config_from_hf,
    from_hf_state_dict,
    load_hf_decoder_weights,
    load_hf_llama,
)

transformers = pytest.importorskip("transformers")

SMALL: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.15,
}


def _save(model: Any, folder: Path) -> Path:
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


def _llama(folder: Path, *, tied: bool, seed: int = 0) -> tuple[Path, Any]:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return _save(model, folder), model


def _edit_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _max_diff(ours: Transformer, hf: Any, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((ours(ids) - hf(ids).logits).abs().max())


def test_conflicting_tie_loads_the_head_like_transformers(tmp_path: Path) -> None:
    """config.json says tied, the weights hold a different lm_head: transformers 5 keeps
    both (untied); so do we, and the logits agree."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 ties a conflicting lm_head to the embeddings; we follow 5")
    folder, original = _llama(tmp_path, tied=False)
    _edit_config(folder, tie_word_embeddings=True)
    assert resolve_hf_tie(folder) is False
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    ours = load_hf_llama(folder).eval()
    assert ours.config.tie_embeddings is False
    ids = torch.randint(0, 128, (2, 12))
    diff = _max_diff(ours, hf, ids)
    print(f"\n[strict] tie conflict: max |logit diff| vs transformers = {diff:.3e}")
    assert diff <= 1e-4
    assert _max_diff(ours, original, ids) <= 1e-4


def test_head_saved_twice_is_tied(tmp_path: Path) -> None:
    folder, hf = _llama(tmp_path, tied=True)
    state = load_file(str(folder / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(folder / "model.safetensors"), {"format": "pt"})
    assert resolve_hf_tie(folder) is True
    ours = load_hf_llama(folder).eval()
    assert ours.config.tie_embeddings is True and ours.lm_head is None
    assert _max_diff(ours, hf, torch.randint(0, 128, (1, 7))) <= 1e-4


def test_untied_config_without_head_is_an_error(tmp_path: Path) -> None:
    folder, _ = _llama(tmp_path, tied=True)
    _edit_config(folder, tie_word_embeddings=False)
    msg = "says tie_word_embeddings=false but the weights hold no lm_head.weight"
    with pytest.raises(ValueError, match=msg):
        load_hf_llama(folder)
    with pytest.raises(ValueError, match=msg):
        resolve_hf_tie(folder)


def test_tied_config_with_different_head_is_rejected_by_the_mapping(tmp_path: Path) -> None:
    folder, _ = _llama(tmp_path, tied=False)
    state = load_file(str(folder / "model.safetensors"))
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), tie_embeddings=True)
    with pytest.raises(ValueError, match="lm_head.weight that differs from model.embed_tokens"):
        from_hf_state_dict(state, cfg)
    # asking for a tied head explicitly contradicts the weights
    with pytest.raises(ValueError, match="differs from model.embed_tokens"):
        load_hf_llama(folder, tie_embeddings=True)


@pytest.mark.parametrize("window", [None, 16])
def test_mistral_parity(tmp_path: Path, window: int | None) -> None:
    torch.manual_seed(1)
    cfg = transformers.MistralConfig(**SMALL, sliding_window=window, tie_word_embeddings=False)
    hf = transformers.MistralForCausalLM(cfg).eval()
    folder = _save(hf, tmp_path)
    ours = load_hf_llama(folder).eval()
    assert ours.config.max_seq_len == (64 if window is None else window)
    ids = torch.randint(0, 128, (2, ours.config.max_seq_len))
    diff = _max_diff(ours, hf, ids)
    print(f"\n[strict] mistral sliding_window={window}: max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4
    if window is not None:  # past the window transformers' attention differs: the cap matters
        longer = torch.randint(0, 128, (1, window + 8))
        with torch.no_grad():
            assert (ours(longer) - hf(longer).logits).abs().max() > 1e-3


def test_qwen2_and_unknown_types_are_rejected() -> None:
    base = {**SMALL, "model_type": "qwen2"}
    with pytest.raises(ValueError, match="model_type 'qwen2' is not supported .*q/k/v"):
        config_from_hf(base)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not a supported decoder"):
        config_from_hf({**base, "model_type": "gpt2"})


def _dense(config: ModelConfig) -> Transformer:
    model = Transformer(config)
    model.init_weights()
    return model


def test_load_into_an_existing_decoder(tmp_path: Path) -> None:
    folder, hf = _llama(tmp_path, tied=False)
    config = config_from_hf(json.loads((folder / "config.json").read_text()), max_seq_len=32)
    model = _dense(config)
    assert load_hf_decoder_weights(model, folder) == []
    assert _max_diff(model.eval(), hf, torch.randint(0, 128, (2, 9))) <= 1e-4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_layers": 3}, "n_layers = 3 but .* has 2"),
        ({"n_heads": 8, "n_kv_heads": 2}, "n_heads = 8 but .* has 4"),
        ({"vocab_size": 130}, "vocab_size = 130 but .* has 128"),
        ({"tie_embeddings": True}, "tie_embeddings = True but .* has False"),
        ({"max_seq_len": 65}, "max_seq_len = 65 but .* supports 64"),
    ],
)
def test_existing_decoder_must_match(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    folder, _ = _llama(tmp_path, tied=False)
    fields = {**config_from_hf(json.loads((folder / "config.json").read_text())).model_dump()}
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        load_hf_decoder_weights(_dense(ModelConfig(**fields)), folder)


def test_missing_and_unexpected_weights_are_named(tmp_path: Path) -> None:
    folder, _ = _llama(tmp_path, tied=False)
    config = config_from_hf(json.loads((folder / "config.json").read_text()))
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.0.self_attn.q_proj.weight"]
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(folder / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_hf_decoder_weights(_dense(config), folder)
    msg = str(err.value)
    assert "missing: ['model.layers.0.self_attn.q_proj.weight']" in msg
    assert "unexpected: ['model.layers.0.self_attn.q_proj.bias']" in msg
