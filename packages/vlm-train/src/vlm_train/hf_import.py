"""Start from Hugging Face folders: the tokenizer of a pretrained LLM, and a whole Llava
model as a ``joint_decoder`` VLM.

``model.pretrained`` (in ``[model]``) covers the decoder; :func:`pretrained_tokenizer`
gives the tokenizer of the same folder, checked against the decoder's vocabulary;
:func:`load_llava` turns a ``LlavaForConditionalGeneration`` folder (Llama / Mistral
text model + SigLIP or CLIP tower) into our tower, ``mlp_2layer`` adapter and decoder.

How a Llava prompt maps: our ``joint_decoder`` puts the image tokens before all the
text, so the imported model computes exactly what transformers computes for prompts
that *start* with the image (``<image> x N`` then the text).  A Llava chat prompt with
text before ``<image>`` (``"USER: <image>\\n..."``) is not reproduced position for
position: put the image first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlm_config import JobConfig
from vlm_config.model import hf_decoder_fields, read_hf_config
from vlm_train.errors import VLMTrainError
from vlm_train.tokenizer import TextTokenizer

__all__ = [
    "HFImportError",
    "load_llava",
    "llava_job",
    "pretrained_chat_template",
    "pretrained_tokenizer",
]

#: Llava ``vision_config.model_type`` -> (our encoder type, the select strategy it needs)
_TOWERS = {
    "siglip_vision_model": ("siglip", "full"),
    "clip_vision_model": ("clip", "default"),
}
_ACTIVATIONS = {"gelu": "gelu", "silu": "silu", "relu": "relu"}
#: vision-config keys that are bookkeeping, not tower hyper-parameters
_NOT_TOWER_KEYS = frozenset(
    {"model_type", "transformers_version", "architectures", "dtype", "torch_dtype"}
)


class HFImportError(VLMTrainError, ValueError):
    """A Hugging Face folder that cannot become one of our models."""


def pretrained_tokenizer(folder: str | Path, vocab_size: int | None = None) -> TextTokenizer:
    """The tokenizer of a Hugging Face model folder (``tokenizer.json``, with
    ``tokenizer_config.json``'s ``bos_token`` / ``eos_token`` / ``pad_token`` when given),
    read with the ``tokenizers`` library.

    Args:
        vocab_size: the decoder's ``model.vocab_size``; every token id must be below it.

    Raises:
        HFImportError: no ``tokenizer.json``, no BOS/EOS token, or a tokenizer with more
            tokens than ``vocab_size``.
    """
    from vlm_data import DataError
    from vlm_data.tokenizer import pretrained_tokenizer as _load

    try:
        return _load(folder, vocab_size)
    except DataError as exc:
        raise HFImportError(str(exc)) from exc


def pretrained_chat_template(folder: str | Path) -> str | None:
    """The folder's chat template (``chat_template.jinja``, or ``chat_template`` in
    ``tokenizer_config.json``), or ``None``."""
    path = Path(folder).expanduser()
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def _llava_config(folder: Path) -> Any:
    """transformers' ``LlavaConfig`` of the folder (sub-configs with their defaults),
    after the torch-free checks on ``config.json``."""
    raw = read_hf_config(folder)
    if raw.get("model_type") != "llava":
        raise HFImportError(
            f"{folder} holds a {raw.get('model_type')!r} model, not a Llava "
            "(LlavaForConditionalGeneration) folder"
        )
    vision = raw.get("vision_config") or {}
    tower_type = vision.get("model_type", "clip_vision_model")
    if tower_type not in _TOWERS:
        raise HFImportError(
            f"{folder}: Llava vision tower {tower_type!r} is not supported; supported: "
            f"{', '.join(_TOWERS)} (SigLIP, CLIP)"
        )
    import transformers

    return transformers.LlavaConfig.from_pretrained(str(folder))


def llava_job(folder: str | Path, *, max_text_len: int | None = None) -> JobConfig:
    """The :class:`JobConfig` of a Llava folder: ``model`` from its text config,
    ``encoder`` = its tower as an inline ``tower`` (its weights come from the folder in
    :func:`load_llava`), ``adapter`` = ``mlp_2layer`` with the projector's activation,
    ``arch`` = ``joint_decoder``.

    Args:
        max_text_len: text budget; default ``min(512, max_seq_len - image tokens)``.

    Raises:
        VLMTrainError: not a Llava folder, a tower other than SigLIP / CLIP, a select
            strategy that does not fit the tower (SigLIP needs ``full``: it has no CLS to
            drop; CLIP needs ``default``: its CLS is not a patch), several feature layers,
            a projector without bias or with another activation, or an unsupported
            text model (see :func:`vlm_config.model.hf_decoder_fields`).
    """
    path = Path(folder).expanduser()
    cfg = _llava_config(path)
    vision = cfg.vision_config.to_dict()
    family, strategy = _TOWERS[vision["model_type"]]
    if cfg.vision_feature_select_strategy != strategy:
        raise HFImportError(
            f"{path}: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} "
            f"does not fit a {family} tower (it needs {strategy!r}); our {family} encoder "
            f"{'keeps every patch' if family == 'siglip' else 'drops only the CLS token'}"
        )
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise HFImportError(
            f"{path}: vision_feature_layer={layer} concatenates several layers; our encoders "
            "take one"
        )
    act = _ACTIVATIONS.get(cfg.projector_hidden_act)
    if act is None or not cfg.multimodal_projector_bias:
        raise HFImportError(
            f"{path}: projector (act={cfg.projector_hidden_act!r}, bias="
            f"{cfg.multimodal_projector_bias}) is not an mlp_2layer (gelu / silu / relu, bias)"
        )
    try:
        model = hf_decoder_fields(cfg.text_config.to_dict(), where=f"{path} text_config")
    except ValueError as exc:
        raise HFImportError(str(exc)) from None
    model["tie_embeddings"] = bool(cfg.tie_word_embeddings or cfg.text_config.tie_word_embeddings)
    tower = {k: v for k, v in vision.items() if k not in _NOT_TOWER_KEYS}
    patches = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
    room = model["max_seq_len"] - patches
    raw: dict[str, Any] = {
        "name": path.name or "llava",
        "model": model,
        "encoder": {"type": family, "tower": tower, "feature_layer": layer},
        "adapter": {"type": "mlp_2layer", "activation": act},
        "arch": {"arch": "joint_decoder", "max_text_len": max_text_len or min(512, room)},
    }
    return JobConfig.model_validate(raw)


_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_HEAD_KEYS = ("language_model.lm_head.weight", "lm_head.weight")
_TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")
_PROJ_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def _split_llava_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], ...]:
    """``(text in LlamaForCausalLM names, tower, projector, unknown)`` for both layouts
    transformers writes (``language_model.model.*`` and ``model.language_model.*``)."""
    text: dict[str, Tensor] = {}
    tower: dict[str, Tensor] = {}
    proj: dict[str, Tensor] = {}
    unknown: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in _HEAD_KEYS:
            text["lm_head.weight"] = value
        elif key.startswith(_TEXT_PREFIXES):
            text["model." + key.split(".", 2)[2]] = value
        elif key.startswith(_TOWER_PREFIXES):
            rest = key.split("vision_tower.", 1)[1]
            tower[rest.removeprefix("vision_model.")] = value
        elif key.startswith(_PROJ_PREFIXES):
            proj[key.split("multi_modal_projector.", 1)[1]] = value
        else:
            unknown[key] = value
    return text, tower, proj, unknown


def _tower_skipped(name: str, kept_layers: int) -> bool:
    """Llava tower weights its forward never reads with ``hidden_states[layer]``: layers
    past the feature layer, the post-layernorm and SigLIP's pooling head."""
    if name.startswith(("post_layernorm.", "head.")):
        return True
    if name.startswith("encoder.layers."):
        return int(name.split(".")[2]) >= kept_layers
    return False


def load_llava(folder: str | Path, *, dtype: torch.dtype | None = None) -> tuple[Any, JobConfig]:
    """A Llava folder as our ``joint_decoder`` :class:`~vlm_strategies.VLMWrapper` (tower,
    ``mlp_2layer`` adapter, decoder) and its :class:`JobConfig` (:func:`llava_job`).

    Strict: every text and projector weight is used, every shape checked, the tied /
    untied head decided by the weights (as transformers does); of the tower, only the
    weights Llava's forward never reads are skipped (layers past
    ``vision_feature_layer``, ``post_layernorm``, SigLIP's pooling head).  The model is
    in eval mode, in ``dtype`` (default float32).

    Raises:
        VLMTrainError: see :func:`llava_job`; missing, unexpected or mis-shaped weights.
        FileNotFoundError: no folder, ``config.json`` or weights.
    """
    from vlm_parallel import materialize
    from vlm_strategies import build_vlm
    from vlm_transformer.hf import _read_weights, from_hf_state_dict, hf_weights_tied

    path = Path(folder).expanduser()
    job = llava_job(path)
    text, tower, proj, unknown = _split_llava_state(_read_weights(path))
    if unknown:
        raise HFImportError(f"{path}: weights that are not part of a Llava: {sorted(unknown)}")
    raw = read_hf_config(path)
    text_raw = {**raw.get("text_config", {})}
    text_raw.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
    tied = hf_weights_tied(text_raw, text, where=str(path))
    if tied != job.model.tie_embeddings:
        job.model.tie_embeddings = tied
    try:
        mapped = {f"transformer.{k}": v for k, v in from_hf_state_dict(text, job.model).items()}
    except ValueError as exc:
        raise HFImportError(f"{path} text model: {exc}") from None

    model = build_vlm(job, init_device="meta")
    materialize(model, torch.device("cpu"))
    model.init_weights()  # rotary tables; every weight is overwritten below
    ours = model.state_dict()
    core = {k.removeprefix("vision_encoder.tower.").removeprefix("vision_model."): k for k in ours}
    kept = int(model.vision_encoder.num_layers_kept)
    for name, value in tower.items():
        if _tower_skipped(name, kept):
            continue
        target = core.get(name)
        if target is None or not target.startswith("vision_encoder."):
            unknown[f"vision_tower.{name}"] = value
            continue
        mapped[target] = value
    for name, value in proj.items():
        ours_name = name.replace("linear_1.", "fc1.").replace("linear_2.", "fc2.")
        mapped[f"adapter.{ours_name}"] = value
    buffers = {k for k, _ in model.named_buffers()}
    missing = sorted(k for k in ours if k not in mapped and k not in buffers)
    unexpected = sorted([*unknown, *(k for k in mapped if k not in ours)])
    misshaped = sorted(
        f"{k}: ours {tuple(ours[k].shape)}, Llava {tuple(v.shape)}"
        for k, v in mapped.items()
        if k in ours and ours[k].shape != v.shape
    )
    if missing or unexpected or misshaped:
        raise HFImportError(
            f"{path}: Llava weights do not fit the model: missing {missing}; unexpected "
            f"{unexpected}; mis-shaped {misshaped}"
        )
    with torch.no_grad():
        for key, value in mapped.items():
            ours[key].copy_(value)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    return model, job
