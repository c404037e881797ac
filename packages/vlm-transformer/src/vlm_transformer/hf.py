"""Hugging Face Llama interop: config mapping, weight mapping, load and export.

Supported checkpoints: ``model_type == "llama"`` (``LlamaForCausalLM``) with
``hidden_act == "silu"``, no attention/MLP bias, ``head_dim == hidden_size /
num_attention_heads``, ``pretraining_tp == 1`` and default RoPE (no ``rope_scaling`` /
``rope_type == "default"``). Anything else raises ``ValueError`` naming the field.

Weight-name mapping (``i`` = layer index; ours <- Hugging Face; ``cat`` along dim 0)::

    embed.weight                              <- model.embed_tokens.weight
    trunk.layers.i.attn_norm.weight           <- model.layers.i.input_layernorm.weight
    trunk.layers.i.attn.qkv_proj.weight       <- cat(model.layers.i.self_attn.{q,k,v}_proj.weight)
    trunk.layers.i.attn.o_proj.weight         <- model.layers.i.self_attn.o_proj.weight
    trunk.layers.i.mlp_norm.weight            <- model.layers.i.post_attention_layernorm.weight
    trunk.layers.i.mlp.gate_up_proj.weight    <- cat(model.layers.i.mlp.{gate,up}_proj.weight)
    trunk.layers.i.mlp.down_proj.weight       <- model.layers.i.mlp.down_proj.weight
    trunk.norm.weight                         <- model.norm.weight
    lm_head.weight                            <- lm_head.weight   (absent when tied)

Reading uses ``json`` + ``safetensors`` (or ``torch.load(weights_only=True)`` for
``pytorch_model*.bin``) only; ``transformers`` is needed just for
:func:`to_hf_config` (extra ``[hf]``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from vlm_config import ModelConfig
from vlm_transformer.model import Transformer

__all__ = [
    "config_from_hf",
    "from_hf_state_dict",
    "hf_config_dict",
    "load_hf_llama",
    "save_hf_llama",
    "to_hf_config",
    "to_hf_state_dict",
]

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _get(cfg: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides: Any) -> ModelConfig:
    """Map a Hugging Face ``LlamaConfig`` (object or ``config.json`` dict) to ``ModelConfig``.

    ``hidden_size -> dim``, ``num_hidden_layers -> n_layers``, ``num_attention_heads ->
    n_heads``, ``num_key_value_heads -> n_kv_heads``, ``intermediate_size ->
    ffn_hidden_dim``, ``rms_norm_eps -> norm_eps``, ``rope_theta`` (or
    ``rope_parameters["rope_theta"]``), ``max_position_embeddings -> max_seq_len``,
    ``tie_word_embeddings -> tie_embeddings``, ``initializer_range -> init_std``;
    ``mlp="swiglu"``, ``norm_type="rmsnorm"``. ``overrides`` replace mapped fields.

    Raises:
        ValueError: an unsupported feature (see the module docstring).
    """
    model_type = _get(hf_config, "model_type")
    if model_type != "llama":
        raise ValueError(f"only model_type 'llama' is supported, got {model_type!r}")
    problems = []
    if _get(hf_config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={_get(hf_config, 'hidden_act')!r} (need 'silu')")
    if _get(hf_config, "attention_bias", False):
        problems.append("attention_bias=True")
    if _get(hf_config, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if _get(hf_config, "pretraining_tp", 1) not in (1, None):
        problems.append(f"pretraining_tp={_get(hf_config, 'pretraining_tp')}")
    hidden = int(_get(hf_config, "hidden_size"))
    heads = int(_get(hf_config, "num_attention_heads"))
    head_dim = _get(hf_config, "head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        problems.append(f"head_dim={head_dim} != hidden_size/num_attention_heads")
    rope_params = _get(hf_config, "rope_parameters") or {}
    scaling = _get(hf_config, "rope_scaling")
    rope_type = (
        (rope_params or {}).get("rope_type", "default")
        if isinstance(rope_params, Mapping)
        else "default"
    )
    if scaling and (scaling.get("rope_type", scaling.get("type")) not in ("default", None)):
        problems.append(f"rope_scaling={scaling}")
    if rope_type != "default":
        problems.append(f"rope_type={rope_type!r}")
    if problems:
        raise ValueError("unsupported Llama config: " + "; ".join(problems))
    theta = _get(hf_config, "rope_theta")
    if theta is None and isinstance(rope_params, Mapping):
        theta = rope_params.get("rope_theta")
    fields: dict[str, Any] = {
        "dim": hidden,
        "n_layers": int(_get(hf_config, "num_hidden_layers")),
        "n_heads": heads,
        "n_kv_heads": _get(hf_config, "num_key_value_heads") or heads,
        "vocab_size": int(_get(hf_config, "vocab_size")),
        "ffn_hidden_dim": int(_get(hf_config, "intermediate_size")),
        "mlp": "swiglu",
        "norm_type": "rmsnorm",
        "norm_eps": float(_get(hf_config, "rms_norm_eps", 1e-6)),
        "max_seq_len": int(_get(hf_config, "max_position_embeddings", 2048)),
        "rope_theta": float(theta if theta is not None else 10000.0),
        "tie_embeddings": bool(_get(hf_config, "tie_word_embeddings", False)),
        "qk_norm": False,
        "init_std": float(_get(hf_config, "initializer_range", 0.02)),
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_dict(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A Llama ``config.json`` dict for ``config``.

    Raises:
        ValueError: ``config`` uses features Llama lacks (GELU MLP, LayerNorm, QK norm).
    """
    problems = []
    if config.mlp != "swiglu":
        problems.append(f"mlp={config.mlp!r}")
    if config.norm_type != "rmsnorm":
        problems.append(f"norm_type={config.norm_type!r}")
    if config.qk_norm:
        problems.append("qk_norm=True")
    if problems:
        raise ValueError("cannot express as a Hugging Face Llama config: " + "; ".join(problems))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.hidden_dim,
        "vocab_size": config.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
    }


def to_hf_config(config: ModelConfig) -> Any:
    """``transformers.LlamaConfig`` for ``config`` (needs the ``[hf]`` extra)."""
    from transformers import LlamaConfig

    d = hf_config_dict(config)
    for key in ("architectures", "model_type", "torch_dtype", "dtype", "rope_scaling"):
        d.pop(key)
    return LlamaConfig(**d)


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, hd = config.dim, config.head_dim
    q, kv, f = config.n_heads * hd, config.kv_heads * hd, config.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
        )
    shapes["model.norm.weight"] = (d,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def from_hf_state_dict(hf_state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Map a Hugging Face Llama state dict to ``Transformer`` parameter names (fusing
    q/k/v and gate/up). ``lm_head.weight`` is ignored when tied, as are
    ``*rotary_emb.inv_freq`` buffers.

    Raises:
        ValueError: listing every missing, unexpected and mis-shaped weight.
    """
    expected = _expected_shapes(config)
    state = {
        k: v
        for k, v in hf_state.items()
        if not k.endswith(_IGNORED_SUFFIXES)
        and not (config.tie_embeddings and k == "lm_head.weight")
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: expected {expected[k]}, got {tuple(state[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    if missing or unexpected or misshaped:
        raise ValueError(
            "Hugging Face Llama weights do not match the config:\n"
            f"  missing: {missing}\n  unexpected: {unexpected}\n  mis-shaped: {misshaped}"
        )
    out = {"embed.weight": state["model.embed_tokens.weight"]}
    for i in range(config.n_layers):
        p, o = f"model.layers.{i}.", f"trunk.layers.{i}."
        out[o + "attn_norm.weight"] = state[p + "input_layernorm.weight"]
        out[o + "attn.qkv_proj.weight"] = torch.cat(
            [state[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0
        )
        out[o + "attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"]
        out[o + "mlp_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        out[o + "mlp.gate_up_proj.weight"] = torch.cat(
            [state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]], dim=0
        )
        out[o + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"]
    out["trunk.norm.weight"] = state["model.norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def to_hf_state_dict(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Inverse of :func:`from_hf_state_dict`: ``Transformer.state_dict()`` -> Hugging Face
    Llama names (contiguous tensors, q/k/v and gate/up split).

    Raises:
        ValueError: listing missing/unexpected keys (e.g. a non-dense trunk).
    """
    hd = config.head_dim
    q, kv, f = config.n_heads * hd, config.kv_heads * hd, config.hidden_dim
    names = {"embed.weight", "trunk.norm.weight"}
    if not config.tie_embeddings:
        names.add("lm_head.weight")
    for i in range(config.n_layers):
        o = f"trunk.layers.{i}."
        names.update(
            o + n
            for n in (
                "attn_norm.weight",
                "attn.qkv_proj.weight",
                "attn.o_proj.weight",
                "mlp_norm.weight",
                "mlp.gate_up_proj.weight",
                "mlp.down_proj.weight",
            )
        )
    missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
    if missing or unexpected:
        raise ValueError(
            "state dict is not a dense Llama-compatible Transformer:\n"
            f"  missing: {missing}\n  unexpected: {unexpected}"
        )
    out = {"model.embed_tokens.weight": state["embed.weight"]}
    for i in range(config.n_layers):
        p, o = f"model.layers.{i}.", f"trunk.layers.{i}."
        out[p + "input_layernorm.weight"] = state[o + "attn_norm.weight"]
        wq, wk, wv = state[o + "attn.qkv_proj.weight"].split([q, kv, kv], dim=0)
        out[p + "self_attn.q_proj.weight"] = wq
        out[p + "self_attn.k_proj.weight"] = wk
        out[p + "self_attn.v_proj.weight"] = wv
        out[p + "self_attn.o_proj.weight"] = state[o + "attn.o_proj.weight"]
        out[p + "post_attention_layernorm.weight"] = state[o + "mlp_norm.weight"]
        gate, up = state[o + "mlp.gate_up_proj.weight"].split([f, f], dim=0)
        out[p + "mlp.gate_proj.weight"] = gate
        out[p + "mlp.up_proj.weight"] = up
        out[p + "mlp.down_proj.weight"] = state[o + "mlp.down_proj.weight"]
    out["model.norm.weight"] = state["trunk.norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def _read_weights(folder: Path) -> dict[str, Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for name in files:
            state.update(load_file(str(folder / name)))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for b in bins:
            state.update(torch.load(b, map_location="cpu", weights_only=True))
        return state
    raise ValueError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model*.bin"
    )


def load_hf_llama(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **config_overrides: Any,
) -> Transformer:
    """Build a :class:`Transformer` from a local Hugging Face Llama folder (no network).

    The model is constructed on the meta device and the mapped weights are assigned
    directly (no random init pass). ``dtype`` defaults to the checkpoint's dtype.

    Raises:
        ValueError: unsupported config, or missing/unexpected/mis-shaped weights.
        FileNotFoundError: no ``config.json`` in ``path``.
    """
    folder = Path(path)
    hf_cfg = json.loads((folder / "config.json").read_text())
    config = config_from_hf(hf_cfg, **config_overrides)
    state = from_hf_state_dict(_read_weights(folder), config)
    with torch.device("meta"):
        model = Transformer(config)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary.to_empty(device=device)  # buffers off meta; _apply recomputes inv_freq
    return model


def save_hf_llama(model: Transformer, path: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that
    ``LlamaForCausalLM.from_pretrained(path)`` loads. Returns the folder.

    Raises:
        ValueError: the model is not expressible as a dense Llama.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model.state_dict(), model.config)
    dtype = next(iter(state.values())).dtype
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model.config, dtype), indent=2))
    save_file(
        {k: v.cpu() for k, v in state.items()}, str(folder / "model.safetensors"), {"format": "pt"}
    )
    return folder
