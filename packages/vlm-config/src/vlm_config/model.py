"""The Llama-style decoder config (torch-free), optionally read from a local Hugging Face
causal-LM folder (``pretrained``)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from vlm_config.components import StrictModel

__all__ = [
    "HF_DECODER_MODEL_TYPES",
    "HF_FIELD_NAMES",
    "ModelConfig",
    "hf_decoder_fields",
    "pretrained_fields",
    "read_hf_config",
    "resolve_hf_tie",
]

#: ``model_type`` values whose decoder maps exactly onto ``vlm_transformer.Transformer``.
HF_DECODER_MODEL_TYPES = ("llama", "mistral")

#: our field -> the Hugging Face ``config.json`` key it is read from (for messages).
HF_FIELD_NAMES: dict[str, str] = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "ffn_hidden_dim": "intermediate_size",
    "mlp": "hidden_act",
    "norm_type": "model_type",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "tie_embeddings": "tie_word_embeddings",
    "qk_norm": "model_type",
}

#: fields a ``pretrained`` config may set to something other than the folder's value
_FREE_FIELDS = frozenset({"init_std", "ffn_dim_multiplier", "multiple_of", "pretrained"})

_REJECTED_MODEL_TYPES = {
    "qwen2": "Qwen2 has q/k/v projection biases, which vlm-transformer's attention lacks",
    "qwen3": "Qwen3 has per-head q/k norms with its own head_dim",
    "gemma": "Gemma scales embeddings and uses a GELU MLP",
    "gemma2": "Gemma2 uses soft-capping and sandwich norms",
    "phi3": "Phi-3 fuses qkv and gate/up projections and may use long-rope scaling",
}


def _get(cfg: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict (``json`` only).

    Raises:
        FileNotFoundError: the folder or its ``config.json`` is missing.
        ValueError: ``config.json`` is not a JSON object.
    """
    path = Path(folder).expanduser()
    file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a folder (expected a Hugging Face model)")
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json (not a save_pretrained folder)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"cannot read {file}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{file} is not a JSON object")
    return raw


def hf_decoder_fields(
    hf_config: Mapping[str, Any] | Any, where: str = "config.json"
) -> dict[str, Any]:
    """Map a Hugging Face decoder config (``config.json`` dict or config object) to
    :class:`ModelConfig` fields, torch-free.

    Supported: ``model_type`` in :data:`HF_DECODER_MODEL_TYPES` (Llama, Mistral) with
    ``hidden_act == "silu"``, no attention / MLP bias, ``head_dim == hidden_size /
    num_attention_heads``, ``pretraining_tp == 1`` and default RoPE.  Mistral's
    ``sliding_window`` (when set) caps ``max_seq_len``: within the window, sliding-window
    attention equals full causal attention, so the mapping stays exact.

    ``hidden_size -> dim``, ``num_hidden_layers -> n_layers``, ``num_attention_heads ->
    n_heads``, ``num_key_value_heads -> n_kv_heads``, ``intermediate_size ->
    ffn_hidden_dim``, ``rms_norm_eps -> norm_eps``, ``rope_theta`` (or
    ``rope_parameters["rope_theta"]``), ``max_position_embeddings -> max_seq_len``,
    ``tie_word_embeddings -> tie_embeddings``, ``initializer_range -> init_std``;
    ``mlp="swiglu"``, ``norm_type="rmsnorm"``, ``qk_norm=False``.

    Raises:
        ValueError: an unsupported ``model_type`` or feature, naming it (one line).
    """
    model_type = _get(hf_config, "model_type")
    if model_type in _REJECTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported "
            f"({_REJECTED_MODEL_TYPES[model_type]}); supported: {', '.join(HF_DECODER_MODEL_TYPES)}"
        )
    if model_type not in HF_DECODER_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a supported decoder; supported: "
            f"{', '.join(HF_DECODER_MODEL_TYPES)}"
        )
    problems = []
    if _get(hf_config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={_get(hf_config, 'hidden_act')!r} (need 'silu')")
    if _get(hf_config, "attention_bias", False):
        problems.append("attention_bias=True")
    if _get(hf_config, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if _get(hf_config, "pretraining_tp", 1) not in (1, None):
        problems.append(f"pretraining_tp={_get(hf_config, 'pretraining_tp')}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if _get(hf_config, key) is None:
            problems.append(f"{key} missing")
    if problems:
        raise ValueError(f"{where}: unsupported {model_type} config: " + "; ".join(problems))
    hidden = int(_get(hf_config, "hidden_size"))
    heads = int(_get(hf_config, "num_attention_heads"))
    head_dim = _get(hf_config, "head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        problems.append(f"head_dim={head_dim} != hidden_size/num_attention_heads")
    rope_params = _get(hf_config, "rope_parameters") or {}
    scaling = _get(hf_config, "rope_scaling")
    rope_type = (
        rope_params.get("rope_type", "default") if isinstance(rope_params, Mapping) else "default"
    )
    if scaling and (scaling.get("rope_type", scaling.get("type")) not in ("default", None)):
        problems.append(f"rope_scaling={scaling}")
    if rope_type != "default":
        problems.append(f"rope_type={rope_type!r}")
    if problems:
        raise ValueError(f"{where}: unsupported {model_type} config: " + "; ".join(problems))
    theta = _get(hf_config, "rope_theta")
    if theta is None and isinstance(rope_params, Mapping):
        theta = rope_params.get("rope_theta")
    max_len = int(_get(hf_config, "max_position_embeddings", 2048))
    window = _get(hf_config, "sliding_window")
    if _get(hf_config, "use_sliding_window", True) is not False and window is not None:
        max_len = min(max_len, int(window))
    intermediate = _get(hf_config, "intermediate_size")
    return {
        "dim": hidden,
        "n_layers": int(_get(hf_config, "num_hidden_layers")),
        "n_heads": heads,
        "n_kv_heads": int(_get(hf_config, "num_key_value_heads") or heads),
        "vocab_size": int(_get(hf_config, "vocab_size")),
        "ffn_hidden_dim": None if intermediate is None else int(intermediate),
        "mlp": "swiglu",
        "norm_type": "rmsnorm",
        "norm_eps": float(_get(hf_config, "rms_norm_eps", 1e-6)),
        "max_seq_len": max_len,
        "rope_theta": float(theta if theta is not None else 10000.0),
        "tie_embeddings": bool(_get(hf_config, "tie_word_embeddings", False)),
        "qk_norm": False,
        "init_std": float(_get(hf_config, "initializer_range", 0.02)),
    }


# ---------------------------------------------------------------- safetensors headers
def _safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    with file.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return 8 + size, header


def _weight_entries(folder: Path) -> dict[str, tuple[Path, int, dict[str, Any]]] | None:
    """name -> (file, data start, header entry) of the folder's safetensors weights, read
    from the headers only; ``None`` when the folder holds no safetensors weights."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        return None
    entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for file in files:
        start, header = _safetensors_header(file)
        for name, entry in header.items():
            if name != "__metadata__":
                entries[name] = (file, start, entry)
    return entries


def _same_bytes(a: tuple[Path, int, dict[str, Any]], b: tuple[Path, int, dict[str, Any]]) -> bool:
    (fa, sa, ea), (fb, sb, eb) = a, b
    if ea["dtype"] != eb["dtype"] or ea["shape"] != eb["shape"]:
        return False
    (a0, a1), (b0, _) = ea["data_offsets"], eb["data_offsets"]
    chunk = 1 << 24
    with fa.open("rb") as ha, fb.open("rb") as hb:
        ha.seek(sa + a0)
        hb.seek(sb + b0)
        left = a1 - a0
        while left > 0:
            n = min(chunk, left)
            if ha.read(n) != hb.read(n):
                return False
            left -= n
    return True


HEAD_KEY = "lm_head.weight"
EMBED_KEY = "model.embed_tokens.weight"


def resolve_hf_tie(folder: str | Path, hf_config: Mapping[str, Any] | None = None) -> bool:
    """Whether the LM head of the decoder in ``folder`` is tied to its embedding, decided
    by the weights (safetensors headers, and the raw bytes in the one ambiguous case) the
    way transformers 5 decides it:

    * no ``lm_head.weight`` in the weights: tied;
    * ``lm_head.weight`` equal to ``model.embed_tokens.weight``: as ``config.json`` says;
    * ``lm_head.weight`` different from the embedding: untied, even when ``config.json``
      says ``tie_word_embeddings=true`` (transformers then also keeps both).

    Without safetensors weights (``pytorch_model*.bin`` only) the config's value is
    returned; the torch-side loader checks it against the tensors.

    Raises:
        ValueError: ``config.json`` says ``tie_word_embeddings=false`` but the weights hold
            no ``lm_head.weight`` (transformers would leave the head randomly initialised).
    """
    path = Path(folder).expanduser()
    raw = read_hf_config(path) if hf_config is None else hf_config
    tied_by_config = bool(_get(raw, "tie_word_embeddings", False))
    entries = _weight_entries(path)
    if entries is None:
        return tied_by_config
    if HEAD_KEY not in entries:
        if not tied_by_config:
            raise ValueError(
                f"{path}: config.json says tie_word_embeddings=false but the weights hold no "
                f"{HEAD_KEY} (transformers would leave the LM head randomly initialised)"
            )
        return True
    if not tied_by_config or EMBED_KEY not in entries:
        return False
    return _same_bytes(entries[HEAD_KEY], entries[EMBED_KEY])


def pretrained_fields(folder: str | Path) -> dict[str, Any]:
    """:func:`hf_decoder_fields` of ``folder/config.json`` with ``tie_embeddings`` resolved
    from the weights (:func:`resolve_hf_tie`)."""
    path = Path(folder).expanduser()
    raw = read_hf_config(path)
    fields = hf_decoder_fields(raw, where=str(path / "config.json"))
    fields["tie_embeddings"] = resolve_hf_tie(path, raw)
    return fields


def _describe_hf(key: str, value: Any, raw: Mapping[str, Any]) -> str:
    hf_key = HF_FIELD_NAMES.get(key, key)
    if key == "tie_embeddings" and bool(raw.get("tie_word_embeddings", False)) != value:
        return f"weights: {'tied' if value else 'untied'} LM head = {value}"
    if key == "max_seq_len" and raw.get("max_position_embeddings") != value:
        return f"sliding_window = {value}"
    if hf_key in ("model_type", "hidden_act"):
        return f"describes a {raw.get('model_type')} decoder with {key} = {value!r}"
    return f"{hf_key} = {raw.get(hf_key, value)}"


class ModelConfig(StrictModel):
    """Decoder hyper-parameters.

    ``ffn_hidden_dim`` wins when set; otherwise the SwiGLU width follows Llama:
    ``int(2 * 4 * dim / 3 * ffn_dim_multiplier)`` rounded up to ``multiple_of``
    (a plain GELU MLP uses ``4 * dim * ffn_dim_multiplier``, rounded the same way).

    ``pretrained``: a local Hugging Face causal-LM folder (Llama or Mistral,
    ``save_pretrained`` layout).  The architecture fields are then read from its
    ``config.json`` (with ``json`` only; see :func:`hf_decoder_fields`) and
    ``tie_embeddings`` from its weights (:func:`resolve_hf_tie`); a field given
    explicitly must agree with the folder (``max_seq_len`` may be smaller), else a
    ``ValidationError`` names both values.  The decoder weights are loaded when the
    model is built (``vlm_parallel.build_parallel_vlm``).  When the folder is gone but
    every architecture field is given (a saved ``job.toml``), validation passes and only
    building a model to train needs the folder again.
    """

    pretrained: str | None = Field(
        default=None, description="local Hugging Face Llama / Mistral folder to start from"
    )
    dim: int = Field(default=256, ge=1)
    n_layers: int = Field(default=4, ge=1)
    n_heads: int = Field(default=8, ge=1)
    n_kv_heads: int | None = Field(default=None, ge=1, description="None means n_heads (MHA)")
    vocab_size: int = Field(default=4096, ge=2)
    ffn_hidden_dim: int | None = Field(default=None, ge=1)
    ffn_dim_multiplier: float = Field(default=1.0, gt=0)
    multiple_of: int = Field(default=32, ge=1)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = Field(default=1e-5, gt=0)
    max_seq_len: int = Field(default=512, ge=1)
    rope_theta: float = Field(default=10000.0, gt=0)
    tie_embeddings: bool = False
    qk_norm: bool = False
    init_std: float = Field(default=0.02, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_pretrained(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not data.get("pretrained"):
            return data
        folder = Path(str(data["pretrained"])).expanduser()
        arch_fields = set(HF_FIELD_NAMES)
        if not (folder / "config.json").is_file() and arch_fields <= set(data):
            return data  # a saved job whose folder is elsewhere: fields are complete
        try:
            raw = read_hf_config(folder)
            fields = pretrained_fields(folder)
        except (OSError, ValueError) as exc:
            raise ValueError(f"model.pretrained: {exc}") from None
        where = str(folder / "config.json")
        merged = dict(fields)
        for key, value in data.items():
            if key in _FREE_FIELDS or key not in fields:
                merged[key] = value
                continue
            expected = fields[key]
            if key == "max_seq_len":
                if isinstance(value, int) and value > expected:
                    raise ValueError(
                        f"model.max_seq_len = {value} but {where} "
                        f"{_describe_hf(key, expected, raw)} (the most it supports)"
                    )
                merged[key] = value
                continue
            if key == "n_kv_heads" and value is None:
                value = data.get("n_heads", fields["n_heads"])
            if value != expected and not (
                isinstance(value, float | int)
                and not isinstance(value, bool)
                and float(value) == float(expected)
            ):
                raise ValueError(
                    f"model.{key} = {value!r} but {where} {_describe_hf(key, expected, raw)}"
                )
            merged[key] = value
        return merged

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Resolved FFN hidden width."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        base = 8 * self.dim / 3 if self.mlp == "swiglu" else 4 * self.dim
        hidden = int(base * self.ffn_dim_multiplier)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide dim ({self.dim})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings"
            )
        return self
