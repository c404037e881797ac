"""``model.pretrained``: the decoder section read from a Hugging Face folder, torch-free
(the safetensors files here are written by hand: an 8-byte header length, a JSON
header, raw bytes)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from vlm_config import JobConfig, ModelConfig
from vlm_config.model import hf_decoder_fields, resolve_hf_tie

LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "intermediate_size": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000.0,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def _safetensors(path: Path, tensors: dict[str, bytes]) -> None:
    header: dict[str, Any] = {}
    offset = 0
    for name, data in tensors.items():
        header[name] = {
            "dtype": "U8",
            "shape": [len(data)],
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(tensors.values()))


def _folder(tmp: Path, *, weights: dict[str, bytes] | None = None, **cfg: Any) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps({**LLAMA, **cfg}))
    if weights is not None:
        _safetensors(tmp / "model.safetensors", weights)
    return tmp


def test_fields_come_from_the_folder(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    cfg = ModelConfig(pretrained=str(folder))
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads) == (32, 2, 4, 2)
    assert (cfg.vocab_size, cfg.hidden_dim, cfg.norm_eps, cfg.rope_theta) == (100, 64, 1e-6, 5e3)
    assert cfg.max_seq_len == 128 and cfg.tie_embeddings is False
    # agreeing explicit fields, a shorter max_seq_len and a free init_std are fine
    same = ModelConfig(pretrained=str(folder), dim=32, n_kv_heads=2, max_seq_len=64, init_std=0.1)
    assert same.max_seq_len == 64


def test_reading_the_folder_imports_no_torch(tmp_path: Path) -> None:
    weights = {"model.embed_tokens.weight": b"\x00", "lm_head.weight": b"\x01"}
    folder = _folder(tmp_path, weights=weights, tie_word_embeddings=True)
    code = (
        "import sys; from vlm_config import ModelConfig; "
        f"c = ModelConfig(pretrained={str(folder)!r}); "
        "assert c.dim == 32 and c.tie_embeddings is False; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dim", 64, "model.dim = 64 but .*config.json hidden_size = 32"),
        ("n_layers", 3, "model.n_layers = 3 but .*config.json num_hidden_layers = 2"),
        ("n_heads", 8, "model.n_heads = 8 but .*config.json num_attention_heads = 4"),
        ("vocab_size", 101, "model.vocab_size = 101 but .*config.json vocab_size = 100"),
        ("max_seq_len", 256, "model.max_seq_len = 256 but .*max_position_embeddings = 128"),
        ("mlp", "gelu", "model.mlp = 'gelu' but .*describes a llama decoder with mlp = 'swiglu'"),
    ],
)
def test_disagreeing_fields_name_both_values(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    folder = _folder(tmp_path)
    with pytest.raises(ValidationError, match=message):
        ModelConfig(pretrained=str(folder), **{field: value})
    # the same error through a whole job (field path model)
    with pytest.raises(ValidationError, match=message):
        JobConfig.model_validate({"model": {"pretrained": str(folder), field: value}})


def test_tie_is_decided_by_the_weights(tmp_path: Path) -> None:
    embed, other = b"\x01\x02\x03\x04", b"\x01\x02\x03\x05"
    conflict = _folder(
        tmp_path / "conflict",
        weights={"model.embed_tokens.weight": embed, "lm_head.weight": other},
        tie_word_embeddings=True,
    )
    assert resolve_hf_tie(conflict) is False
    assert ModelConfig(pretrained=str(conflict)).tie_embeddings is False
    with pytest.raises(ValidationError, match=r"model.tie_embeddings = True but .*untied"):
        ModelConfig(pretrained=str(conflict), tie_embeddings=True)
    twice = _folder(
        tmp_path / "twice",
        weights={"model.embed_tokens.weight": embed, "lm_head.weight": embed},
        tie_word_embeddings=True,
    )
    assert ModelConfig(pretrained=str(twice)).tie_embeddings is True
    headless = _folder(
        tmp_path / "headless",
        weights={"model.embed_tokens.weight": embed},
        tie_word_embeddings=True,
    )
    assert ModelConfig(pretrained=str(headless)).tie_embeddings is True
    broken = _folder(tmp_path / "broken", weights={"model.embed_tokens.weight": embed})
    with pytest.raises(ValidationError, match="tie_word_embeddings=false but the weights hold no"):
        ModelConfig(pretrained=str(broken))


def test_missing_folder_and_unsupported_types(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="model.pretrained: .* is not a folder"):
        ModelConfig(pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(ValidationError, match="has no config.json"):
        ModelConfig(pretrained=str(tmp_path))
    qwen = _folder(tmp_path / "qwen", model_type="qwen2")
    with pytest.raises(ValidationError, match="model_type 'qwen2' is not supported"):
        ModelConfig(pretrained=str(qwen))
    with pytest.raises(ValueError, match="rope_scaling"):
        hf_decoder_fields({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_mistral_window_caps_max_seq_len(tmp_path: Path) -> None:
    folder = _folder(tmp_path, model_type="mistral", sliding_window=48)
    assert ModelConfig(pretrained=str(folder)).max_seq_len == 48
    with pytest.raises(ValidationError, match="model.max_seq_len = 64 .*sliding_window = 48"):
        ModelConfig(pretrained=str(folder), max_seq_len=64)


def test_saved_job_without_the_folder_still_validates(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "llm")
    dumped = ModelConfig(pretrained=str(folder)).model_dump()
    (folder / "config.json").unlink()
    again = ModelConfig(**dumped)
    assert again.dim == 32 and again.pretrained == str(folder)
    with pytest.raises(ValidationError, match="has no config.json"):
        ModelConfig(pretrained=str(folder), dim=32)  # incomplete: the folder is needed
