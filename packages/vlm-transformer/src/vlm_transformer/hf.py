"""Hugging Face Llama / Mistral interop: config mapping, weight mapping, load and export.

Supported checkpoints: ``model_type`` ``"llama"`` (``LlamaForCausalLM``) and
``"mistral"`` (``MistralForCausalLM``; its ``sliding_window`` caps ``max_seq_len``, so
attention stays exact) with ``hidden_act == "silu"``, no attention/MLP bias,
``head_dim == hidden_size / num_attention_heads``, ``pretraining_tp == 1`` and default
RoPE (no ``rope_scaling`` / ``rope_type == "default"``).  Anything else raises
``ValueError`` naming the field; Qwen2 is rejected (q/k/v biases, which
:class:`~vlm_transformer.attention.Attention` does not have).

Loading is strict: every weight in the folder is used (rotary ``inv_freq`` buffers
aside), every shape is checked, missing / unexpected / mis-shaped weights are one
``ValueError`` naming them, and a tied or untied LM head is decided by the weights the
way transformers 5 decides it (:func:`hf_weights_tied`): an ``lm_head.weight`` that
differs from the embedding is loaded as an untied head even when ``config.json`` says
``tie_word_embeddings=true``.

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
from vlm_config.model import EMBED_KEY, HEAD_KEY, hf_decoder_fields, read_hf_config
from vlm_transformer.model import Transformer

__all__ = [
    "config_from_hf",
    "from_hf_state_dict",
    "hf_config_dict",
    "hf_weights_tied",
    "load_hf_decoder_weights",
    "load_hf_llama",
    "read_hf_decoder",
    "save_hf_llama",
    "to_hf_config",
    "to_hf_state_dict",
]

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_HEAD, _EMBED = HEAD_KEY, EMBED_KEY
#: ``ModelConfig`` fields that fix the decoder's architecture (checked on load)
_ARCH_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "kv_heads",
    "vocab_size",
    "hidden_dim",
    "mlp",
    "norm_type",
    "norm_eps",
    "rope_theta",
    "tie_embeddings",
    "qk_norm",
)


def _get(cfg: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides: Any) -> ModelConfig:
    """Map a Hugging Face Llama / Mistral config (object or ``config.json`` dict) to
    ``ModelConfig`` with :func:`vlm_config.model.hf_decoder_fields` (the one torch-free
    mapping ``model.pretrained`` also uses). ``overrides`` replace mapped fields.

    Raises:
        ValueError: an unsupported model type or feature (see the module docstring).
    """
    fields = hf_decoder_fields(hf_config)
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_weights_tied(
    hf_config: Mapping[str, Any] | Any, hf_state: Mapping[str, Tensor], where: str = "weights"
) -> bool:
    """Whether the decoder's LM head is tied to its embedding, decided by the weights as
    transformers 5 decides it (and as :func:`vlm_config.model.resolve_hf_tie` does from
    safetensors headers): no ``lm_head.weight`` -> tied; an ``lm_head.weight`` equal to
    the embedding -> as ``tie_word_embeddings`` says; a different one -> untied.

    Raises:
        ValueError: ``tie_word_embeddings=false`` but no ``lm_head.weight`` in the weights.
    """
    by_config = bool(_get(hf_config, "tie_word_embeddings", False))
    head = hf_state.get(_HEAD)
    if head is None:
        if not by_config:
            raise ValueError(
                f"{where}: config.json says tie_word_embeddings=false but the weights hold no "
                f"{_HEAD} (transformers would leave the LM head randomly initialised)"
            )
        return True
    embed = hf_state.get(_EMBED)
    if not by_config or embed is None:
        return False
    return head.shape == embed.shape and bool(torch.equal(head, embed))


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
    q/k/v and gate/up), strictly: ``*rotary_emb.inv_freq`` buffers are the only entries
    skipped, and with ``config.tie_embeddings`` an ``lm_head.weight`` is accepted only
    when it equals the embedding (it is the same tensor, saved twice).

    Raises:
        ValueError: listing every missing, unexpected and mis-shaped weight, or an
            ``lm_head.weight`` that differs from the embedding of a tied config.
    """
    expected = _expected_shapes(config)
    state = {k: v for k, v in hf_state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_embeddings and _HEAD in state:
        head, embed = state.pop(_HEAD), state.get(_EMBED)
        if embed is None or head.shape != embed.shape or not torch.equal(head, embed):
            raise ValueError(
                f"the weights hold an {_HEAD} that differs from {_EMBED}, but the config ties "
                "them (tie_embeddings=True); load it untied (tie_embeddings=False)"
            )
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


def read_hf_decoder(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json dict, weights)`` of a local Hugging Face folder (no network).

    Raises:
        FileNotFoundError: the folder or its ``config.json`` is missing.
        ValueError: no weights file.
    """
    folder = Path(path).expanduser()
    return read_hf_config(folder), _read_weights(folder)


def check_config_matches(config: ModelConfig, expected: ModelConfig, where: str) -> None:
    """Raise ``ValueError`` naming every architecture field where ``config`` (ours) and
    ``expected`` (the checkpoint's) differ, and a ``max_seq_len`` above the checkpoint's."""
    problems = [
        f"{name} = {getattr(config, name)!r} but {where} has {getattr(expected, name)!r}"
        for name in _ARCH_FIELDS
        if getattr(config, name) != getattr(expected, name)
    ]
    if config.max_seq_len > expected.max_seq_len:
        problems.append(
            f"max_seq_len = {config.max_seq_len} but {where} supports {expected.max_seq_len}"
        )
    if problems:
        raise ValueError("decoder config does not match the checkpoint: " + "; ".join(problems))


def load_hf_llama(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **config_overrides: Any,
) -> Transformer:
    """Build a :class:`Transformer` from a local Hugging Face Llama / Mistral folder (no
    network), strictly (see the module docstring).

    The model is constructed on the meta device and the mapped weights are assigned
    directly (no random init pass). ``dtype`` defaults to the checkpoint's dtype.
    ``tie_embeddings`` comes from the weights (:func:`hf_weights_tied`).

    Raises:
        ValueError: unsupported config, a tied/untied contradiction, or missing /
            unexpected / mis-shaped weights.
        FileNotFoundError: no folder or no ``config.json`` in ``path``.
    """
    hf_cfg, weights = read_hf_decoder(path)
    tied = hf_weights_tied(hf_cfg, weights, where=str(path))
    config = config_from_hf(hf_cfg, **{"tie_embeddings": tied, **config_overrides})
    state = from_hf_state_dict(weights, config)
    with torch.device("meta"):
        model = Transformer(config)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary.to_empty(device=device)  # buffers off meta; _apply recomputes inv_freq
    return model


@torch.no_grad()
def load_hf_decoder_weights(model: Transformer, path: str | Path) -> list[str]:
    """Copy the decoder weights of a local Hugging Face Llama / Mistral folder into an
    existing, materialised ``model`` in place (cast to each parameter's dtype/device).

    ``model.config`` must describe the checkpoint (every architecture field equal,
    ``tie_embeddings`` as the weights decide it, ``max_seq_len`` no larger); every
    checkpoint weight must land on a parameter of ``model`` with the same name and shape.
    Parameters the arch's trunk adds on top of the dense layout (e.g. cross-attention
    blocks) are left as they are and returned.

    Returns:
        The sorted state-dict keys of ``model`` that the checkpoint did not provide.

    Raises:
        ValueError: a config mismatch (naming both values), a tied/untied contradiction,
            missing / unexpected / mis-shaped weights, or checkpoint weights that find no
            parameter in ``model`` (a trunk without the dense layer names, e.g. modality copies).
        FileNotFoundError: no folder or no ``config.json``.
    """
    folder = Path(path).expanduser()
    hf_cfg, weights = read_hf_decoder(folder)
    tied = hf_weights_tied(hf_cfg, weights, where=str(folder))
    expected = config_from_hf(hf_cfg, tie_embeddings=tied)
    check_config_matches(model.config, expected, str(folder))
    mapped = from_hf_state_dict(weights, model.config)
    target = model.state_dict()
    unused = sorted(k for k in mapped if k not in target)
    if unused:
        raise ValueError(
            f"{folder}: the decoder has no parameter for {len(unused)} checkpoint weights "
            f"(e.g. {', '.join(unused[:3])}): its trunk does not use the dense Llama layout"
        )
    misshaped = sorted(
        f"{k}: model {tuple(target[k].shape)}, checkpoint {tuple(v.shape)}"
        for k, v in mapped.items()
        if target[k].shape != v.shape
    )
    if misshaped:
        raise ValueError(f"{folder}: mis-shaped weights: {misshaped}")
    for key, value in mapped.items():
        target[key].copy_(value)
    buffers = {name for name, _ in model.named_buffers()}
    return sorted(k for k in target if k not in mapped and k not in buffers)


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
