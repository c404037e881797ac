"""Export a trained model as a Hugging Face folder that transformers loads with no code
of ours.

* ``joint_decoder`` + a ``siglip`` / ``clip`` tower + an ``mlp_2layer`` adapter ->
  ``LlavaForConditionalGeneration`` (+ ``LlavaProcessor``: image processor, tokenizer
  with an ``<image>`` token, ``generation_config.json``);
* the decoder alone (``decoder_only=True``) -> ``LlamaForCausalLM`` (+ tokenizer).

Every other combination (``cross_attention``, ``mot``, ``moma``, plugin archs, pooling
adapters, the ``random`` stub encoder, ...) has no transformers equivalent and is one
:class:`ExportError` line saying so.

How prompts map: our ``joint_decoder`` puts the image tokens first, then the text
``[BOS] prompt``; Llava scatters the image features at the ``<image>`` positions of the
prompt.  So the exported model reproduces ours exactly for the text
``"<image>" + bos_token + prompt`` tokenised without added special tokens (the
processor expands the one ``<image>`` to the tower's ``N`` image tokens)::

    inputs = processor(images=image, text="<image>" + tok.bos_token + prompt,
                       add_special_tokens=False, return_tensors="pt")

Weight layout written (the names transformers 5 writes for Llava)::

    language_model.model.*                 <- transformer.* (vlm_transformer.hf mapping)
    language_model.lm_head.weight          <- transformer.lm_head.weight (absent when tied)
    multi_modal_projector.linear_1.*       <- adapter.fc1.*
    multi_modal_projector.linear_2.*       <- adapter.fc2.*
    vision_tower.*                         <- vision_encoder.tower.* (already trimmed to
                                              the feature layer; vision_feature_layer=-1)
    vision_tower.[vision_model.]post_layernorm.*  identity LayerNorm: Llava reads
                                              hidden_states[-1], which never passes it

The ``<image>`` token takes the first id the decoder does not use (the tokenizer's
size); when the tokenizer already fills the decoder's vocabulary it is appended and the
embedding (and untied head) grows by one zero row.  ``generation_config.json``
suppresses that id, so greedy decoding never emits it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from vlm_config import JobConfig
from vlm_train.errors import VLMTrainError
from vlm_train.tokenizer import TextTokenizer

__all__ = [
    "IMAGE_TOKEN",
    "ExportError",
    "export_hf",
    "export_hf_llama",
    "export_hf_llava",
    "llava_prompt",
]

IMAGE_TOKEN = "<image>"
_ACTIVATIONS: dict[type[nn.Module], str] = {nn.SiLU: "silu", nn.ReLU: "relu"}
#: tower family -> (Llava vision_feature_select_strategy, processor extra tokens)
_FAMILIES = {"siglip": ("full", 0), "clip": ("default", 1)}


class ExportError(VLMTrainError, ValueError):
    """A model that the requested Hugging Face format cannot express."""


def llava_prompt(prompt: str, bos_token: str) -> str:
    """The text to give the exported Llava processor (with ``add_special_tokens=False``)
    so that it sees exactly what our ``joint_decoder`` saw: image tokens, BOS, prompt."""
    return IMAGE_TOKEN + bos_token + prompt


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - vlm-train depends on vlm-encoders[hf]
        raise ExportError(f"exporting to Hugging Face needs transformers ({exc})") from exc
    return transformers


def _hf_activation(act: nn.Module) -> str | None:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    return _ACTIVATIONS.get(type(act))


def _check_tokenizer(tokenizer: TextTokenizer, vocab_size: int) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise ExportError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{vocab_size}: ids past the embedding cannot be exported"
        )


def _write_tokenizer(
    tokenizer: TextTokenizer, extra_special: list[str] | None = None
) -> tuple[Any, dict[str, int]]:
    """A ``PreTrainedTokenizerFast`` over a copy of ``tokenizer`` (``extra_special`` added
    as special tokens) and the ids of those extra tokens."""
    transformers = _transformers()
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(tokenizer.tokenizer.to_str())
    ids: dict[str, int] = {}
    for text in extra_special or []:
        if tok.token_to_id(text) is None:
            tok.add_special_tokens([AddedToken(text, normalized=False, special=True)])
        idx = tok.token_to_id(text)
        assert idx is not None
        ids[text] = int(idx)
    names = {}
    for key, idx in (
        ("bos_token", tokenizer.bos_id),
        ("eos_token", tokenizer.eos_id),
        ("pad_token", tokenizer.pad_id),
    ):
        names[key] = tok.id_to_token(idx)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **names)
    return fast, ids


def _generation_config(tokenizer: TextTokenizer, suppress: list[int]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    if suppress:
        cfg["suppress_tokens"] = suppress
    return cfg


def _decoder_state(transformer: Any) -> dict[str, Tensor]:
    from vlm_transformer.hf import to_hf_state_dict

    try:
        return to_hf_state_dict(transformer.state_dict(), transformer.config)
    except ValueError as exc:
        raise ExportError(
            "the decoder is not a dense Llama (its trunk adds layers of its own), so "
            f"LlamaForCausalLM cannot express it: {' '.join(str(exc).split())}"
        ) from None


def _llama_config(transformer: Any, vocab_size: int, dtype: torch.dtype) -> dict[str, Any]:
    from vlm_transformer.hf import hf_config_dict

    try:
        cfg = hf_config_dict(transformer.config, dtype)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    cfg["vocab_size"] = vocab_size
    return cfg


def _save_safetensors(state: dict[str, Tensor], folder: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})


def export_hf_llama(transformer: Any, tokenizer: TextTokenizer, out: str | Path) -> Path:
    """Write ``transformer`` (a dense ``vlm_transformer.Transformer``) and ``tokenizer``
    as a folder that ``LlamaForCausalLM.from_pretrained`` / ``AutoTokenizer`` load.

    Returns:
        ``out``.

    Raises:
        ExportError: a non-dense trunk, a feature Llama lacks (GELU MLP, LayerNorm, QK
            norm), or a tokenizer larger than the vocabulary.
    """
    folder = Path(out)
    config = transformer.config
    _check_tokenizer(tokenizer, config.vocab_size)
    state = _decoder_state(transformer)
    dtype = next(iter(state.values())).dtype
    hf_cfg = _llama_config(transformer, config.vocab_size, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    hf_cfg.update({"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps(_generation_config(tokenizer, []), indent=2)
    )
    _save_safetensors(state, folder)
    fast, _ = _write_tokenizer(tokenizer)
    fast.save_pretrained(folder)
    return folder


def _llava_parts(model: Any, job: JobConfig) -> tuple[Any, str, str, int]:
    """``(tower encoder, family, projector activation, image tokens)`` or ExportError."""
    arch = job.arch
    if arch.arch != "joint_decoder":
        raise ExportError(
            f"cannot export arch {arch.arch!r} to Hugging Face: transformers has no "
            "equivalent (only joint_decoder -> LlavaForConditionalGeneration; "
            "--decoder-only exports a dense decoder alone as LlamaForCausalLM)"
        )
    if getattr(arch, "prefix_bidirectional", False):
        raise ExportError(
            "cannot export a joint_decoder with prefix_bidirectional=true: Llava's image "
            "tokens attend causally"
        )
    if model.frames_per_clip != 1 or model.frame_positions is not None:
        raise ExportError(
            f"cannot export a video model (frames_per_clip={model.frames_per_clip}) to "
            "Llava, which takes still images"
        )
    encoder = model.vision_encoder
    family = getattr(encoder, "family", None)
    if family not in _FAMILIES:
        raise ExportError(
            f"cannot export encoder {job.encoder.type!r} to Llava: it needs a siglip or "
            "clip tower (the one vision towers Llava loads with their own code)"
        )
    if getattr(encoder, "post_layernorm", None) is not None:
        raise ExportError(
            "cannot export an encoder with post_layernorm=true to Llava: Llava reads the "
            "raw hidden states of the tower"
        )
    adapter = model.adapter
    dim = model.transformer.config.dim
    fc1, fc2 = getattr(adapter, "fc1", None), getattr(adapter, "fc2", None)
    if job.adapter.type != "mlp_2layer" or fc1 is None or fc2 is None:
        raise ExportError(
            f"cannot export adapter {job.adapter.type!r} to Llava: its projector is an "
            "mlp_2layer (Linear-activation-Linear)"
        )
    if fc1.out_features != dim or fc1.bias is None or fc2.bias is None:
        raise ExportError(
            f"cannot export an mlp_2layer with hidden_dim={fc1.out_features} to Llava: its "
            f"projector's hidden width is the decoder width ({dim})"
        )
    act = _hf_activation(adapter.act)
    if act is None:
        raise ExportError(f"adapter activation {type(adapter.act).__name__} has no HF name")
    return encoder, family, act, int(model.num_image_tokens)


def _tower_state(encoder: Any) -> dict[str, Tensor]:
    """The trimmed tower's weights plus an identity ``post_layernorm`` under the tower's
    own prefix (Llava's vision model has the module but never runs it)."""
    state = dict(encoder.tower.state_dict())
    embed_key = next(k for k in state if "embeddings." in k)
    prefix = embed_key[: embed_key.index("embeddings.")]
    width = int(encoder.feature_dim)
    ref = state[embed_key]
    state[prefix + "post_layernorm.weight"] = torch.ones(width, dtype=ref.dtype)
    state[prefix + "post_layernorm.bias"] = torch.zeros(width, dtype=ref.dtype)
    return state


def export_hf_llava(model: Any, job: JobConfig, tokenizer: TextTokenizer, out: str | Path) -> Path:
    """Write a ``joint_decoder`` model as a ``LlavaForConditionalGeneration`` folder with
    its ``LlavaProcessor`` (see the module docstring for the layout and prompt mapping).

    Returns:
        ``out``.

    Raises:
        ExportError: the arch, encoder, adapter or decoder has no Llava equivalent, or
            the tokenizer is larger than the vocabulary.
    """
    transformers = _transformers()
    encoder, family, act, n_tokens = _llava_parts(model, job)
    transformer = model.transformer
    config = transformer.config
    _check_tokenizer(tokenizer, config.vocab_size)
    fast, ids = _write_tokenizer(tokenizer, [IMAGE_TOKEN])
    image_id = ids[IMAGE_TOKEN]
    vocab = max(config.vocab_size, image_id + 1)

    text = _decoder_state(transformer)
    if vocab > config.vocab_size:
        grow = vocab - config.vocab_size
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in text:
                w = text[key]
                text[key] = torch.cat((w, w.new_zeros(grow, w.shape[1])), dim=0)
    state = {f"language_model.{k}": v for k, v in text.items()}
    tied = "language_model.lm_head.weight" not in state
    state.update({f"vision_tower.{k}": v for k, v in _tower_state(encoder).items()})
    adapter = model.adapter
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        layer = getattr(adapter, ours)
        state[f"multi_modal_projector.{theirs}.weight"] = layer.weight
        state[f"multi_modal_projector.{theirs}.bias"] = layer.bias

    dtype = transformer.embed.weight.dtype
    text_cfg = _llama_config(transformer, vocab, dtype)
    for key in ("architectures", "torch_dtype", "dtype"):
        text_cfg.pop(key, None)
    vision_cfg = encoder.tower.config.to_dict()
    vision_cfg["num_hidden_layers"] = int(encoder.num_layers_kept)
    if "vision_use_head" in vision_cfg:
        vision_cfg["vision_use_head"] = False
    strategy, extra_tokens = _FAMILIES[family]
    llava_cfg = transformers.LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=image_id,
        image_seq_length=n_tokens,
        projector_hidden_act=act,
        vision_feature_layer=-1,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    llava_cfg.architectures = ["LlavaForConditionalGeneration"]
    llava_cfg.dtype = dtype
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    llava_cfg.save_pretrained(folder)
    gen = transformers.GenerationConfig(**_generation_config(tokenizer, [image_id]))
    gen.save_pretrained(folder)
    _save_safetensors(state, folder)
    processor = transformers.LlavaProcessor(
        image_processor=encoder.image_processor,
        tokenizer=fast,
        patch_size=int(encoder.patch),
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(folder)
    return folder


def export_hf(
    model: Any,
    job: JobConfig,
    tokenizer: TextTokenizer,
    out: str | Path,
    *,
    decoder_only: bool = False,
) -> Path:
    """Export ``model`` (a ``VLMWrapper``) to ``out``: Llava, or with ``decoder_only`` its
    decoder alone as Llama.  See :func:`export_hf_llava` / :func:`export_hf_llama`.

    Raises:
        ExportError: the model has no transformers equivalent in that format.
    """
    if decoder_only:
        return export_hf_llama(model.transformer, tokenizer, out)
    return export_hf_llava(model, job, tokenizer, out)
