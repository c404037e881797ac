"""Hugging Face vision towers: SigLIP, SigLIP2 (fixed square grid) and CLIP.

Needs the ``[hf]`` extra (transformers, pillow).  Towers load from local folders
only (``local_files_only=True``); nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm_encoders.base import PreprocessingInfo, VisionEncoder, _as_list
from vlm_encoders.configs import (
    ClipEncoderConfig,
    HFVisionEncoderConfig,
    Siglip2EncoderConfig,
    SiglipEncoderConfig,
)

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["HFVisionEncoder", "build_hf_encoder"]

INSTALL_HINT = "pip install 'vlm-encoders[hf]'"
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class _Family:
    config_cls: str
    model_cls: str
    processor_cls: str
    has_cls_token: bool
    patchified_input: bool


_FAMILIES: dict[str, _Family] = {
    "siglip": _Family(
        "SiglipVisionConfig", "SiglipVisionModel", "SiglipImageProcessor", False, False
    ),
    "siglip2": _Family(
        "Siglip2VisionConfig", "Siglip2VisionModel", "SiglipImageProcessor", False, True
    ),
    "clip": _Family("CLIPVisionConfig", "CLIPVisionModel", "CLIPImageProcessor", True, False),
}
_CONFIG_CLASSES: dict[str, type[HFVisionEncoderConfig]] = {
    "siglip": SiglipEncoderConfig,
    "siglip2": Siglip2EncoderConfig,
    "clip": ClipEncoderConfig,
}


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"the siglip / siglip2 / clip encoders need transformers and pillow: {INSTALL_HINT} "
            f"({exc})"
        ) from exc
    return transformers


def _hf_attr(transformers: Any, name: str) -> Any:
    obj = getattr(transformers, name, None)
    if obj is None:
        raise ImportError(
            f"transformers {transformers.__version__} has no {name}; upgrade it ({INSTALL_HINT})"
        )
    return obj


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """Silence transformers' load reports and progress bars, then restore its settings."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


class HFVisionEncoder(VisionEncoder):
    """A transformers vision tower behind the ``VisionEncoder`` contract.

    Output: ``hidden_states[feature_layer]`` of the tower (transformers'
    indexing: ``0`` embeddings, ``-1`` last layer, ``-2`` penultimate), CLIP's
    CLS token removed, then the tower's ``post_layernorm`` when
    ``post_layernorm=True`` (with ``feature_layer=-1`` that is SigLIP's own
    ``last_hidden_state``).  The tower is trimmed in place at construction:
    layers after ``feature_layer`` and SigLIP's pooling head are deleted, and the
    ``post_layernorm`` moves out of the tower (kept only when used), so every
    remaining parameter takes part in the forward.

    The tower keeps its dtype; pixels are cast to it and features come out in it.

    Args:
        tower: a ``SiglipVisionModel`` / ``Siglip2VisionModel`` / ``CLIPVisionModel``.
        family: ``"siglip"``, ``"siglip2"`` or ``"clip"``.
        image_processor: transformers image processor producing
            ``(B, 3, image_size, image_size)`` pixels (used by ``preprocess``).
        feature_layer: index into ``hidden_states``.
        post_layernorm: apply the tower's final layer norm to the output.
        image_size: square input resolution; required for ``siglip2`` when the
            default ``sqrt(num_patches) * patch_size`` is not wanted, ignored
            otherwise (the tower's ``config.image_size`` is used).
    """

    def __init__(
        self,
        tower: Any,
        *,
        family: str,
        image_processor: Any,
        feature_layer: int = -1,
        post_layernorm: bool = False,
        image_size: int | None = None,
    ):
        if family not in _FAMILIES:
            raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {family!r}")
        spec = _FAMILIES[family]
        vcfg: Any = tower.config
        patch = int(vcfg.patch_size)
        if spec.patchified_input:
            num_patches = int(vcfg.num_patches)
            if image_size is None:
                side = math.isqrt(num_patches)
                if side * side != num_patches:
                    raise ValueError(
                        f"siglip2 num_patches={num_patches} is not a perfect square; "
                        "set image_size to choose the square grid"
                    )
                image_size = side * patch
            if image_size % patch:
                raise ValueError(
                    f"siglip2 image_size={image_size} must be a multiple of patch_size={patch}"
                )
        else:
            image_size = int(vcfg.image_size)
        grid = image_size // patch

        mean, std, processed = _processor_stats(image_processor, image_size)
        if processed != image_size:
            raise ValueError(
                f"the image processor produces {processed}x{processed} images but the "
                f"{family} tower takes {image_size}x{image_size}"
            )
        super().__init__(
            num_tokens=grid * grid,
            feature_dim=int(vcfg.hidden_size),
            preprocessing=PreprocessingInfo(image_size=image_size, mean=mean, std=std),
        )
        self.family = family
        self.has_cls_token = spec.has_cls_token
        self.patchified_input = spec.patchified_input
        self.patch = patch
        self.grid = grid
        self.image_processor = image_processor

        core: Any = getattr(tower, "vision_model", tower)  # transformers 4.x nests the transformer
        layers = core.encoder.layers
        total = len(layers)
        index = feature_layer if feature_layer >= 0 else total + 1 + feature_layer
        if not 0 <= index <= total:
            raise ValueError(
                f"feature_layer={feature_layer} is out of range for a tower of {total} layers "
                f"(hidden_states has {total + 1} entries: {-(total + 1)}..{total})"
            )
        self.feature_layer = feature_layer
        self.num_layers_kept = index
        core.encoder.layers = layers[:index]
        vcfg.num_hidden_layers = index
        if getattr(core, "use_head", False) or hasattr(core, "head"):
            core.use_head = False
            if hasattr(core, "head"):
                del core.head
            if hasattr(vcfg, "vision_use_head"):
                vcfg.vision_use_head = False
        final_norm: nn.Module = core.post_layernorm
        core.post_layernorm = nn.Identity()
        self.tower = tower
        self.post_layernorm: nn.Module | None = final_norm if post_layernorm else None

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the tower (features come out in it)."""
        return next(self.tower.parameters()).dtype

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.dtype)
        if self.patchified_input:
            b, g, p = x.shape[0], self.grid, self.patch
            # (B, 3, g*p, g*p) -> (B, g*g, p*p*3): row-major patches, (row, col, channel)
            # inside a patch, exactly as Siglip2ImageProcessor's convert_image_to_patches.
            patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, -1)
            mask = torch.ones(b, g * g, dtype=torch.long, device=x.device)
            shapes = torch.tensor([[g, g]], dtype=torch.long, device=x.device).expand(b, 2)
            out = self.tower(
                pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes
            ).last_hidden_state
        else:
            out = self.tower(pixel_values=x).last_hidden_state
        if self.has_cls_token:
            out = out[:, 1:, :]
        if self.post_layernorm is not None:
            out = self.post_layernorm(out)
        return out

    def preprocess(self, images: Image | Sequence[Image]) -> torch.Tensor:
        """PIL images -> float32 ``(B, 3, S, S)`` through the transformers image processor."""
        batch = _as_list(images)
        out = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
        return out.to(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, family={self.family!r}, feature_layer={self.feature_layer}, "
            f"post_layernorm={self.post_layernorm is not None}"
        )


def _processor_stats(
    processor: Any, image_size: int
) -> tuple[tuple[float, float, float], tuple[float, float, float], int]:
    """(mean, std, output side) of an image processor; the side is measured on a dummy image."""
    from PIL import Image as PILImage

    if getattr(processor, "do_normalize", True):
        mean = tuple(float(v) for v in processor.image_mean)
        std = tuple(float(v) for v in processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # a non-square dummy catches processors that keep the aspect ratio (no crop)
    dummy = PILImage.new("RGB", (image_size + image_size // 2 + 1, image_size))
    shape = tuple(processor(images=[dummy], return_tensors="pt")["pixel_values"].shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
        raise ValueError(
            f"the image processor ({type(processor).__name__}) does not produce square "
            f"(B, 3, S, S) pixels (got {shape} for a {dummy.size[0]}x{dummy.size[1]} image); "
            f"the tower takes {image_size}x{image_size}"
        )
    return mean, std, int(shape[2])  # type: ignore[return-value]


def _default_processor(transformers: Any, family: str, image_size: int) -> Any:
    """Processor derived from the vision config when the folder has none."""
    cls = _hf_attr(transformers, _FAMILIES[family].processor_cls)
    if family == "clip":
        return cls(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD),
        )
    return cls(
        size={"height": image_size, "width": image_size},
        image_mean=list(SIGLIP_MEAN),
        image_std=list(SIGLIP_STD),
    )


def _folder_processor(
    transformers: Any, family: str, path: Path, image_size: int | None
) -> Any | None:
    """The folder's own image processor (``preprocessor_config.json``), or ``None``."""
    if not (path / "preprocessor_config.json").is_file():
        return None
    proc = transformers.AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    if family == "siglip2" and hasattr(proc, "max_num_patches"):
        # NaFlex processor (variable grid, patchified output): keep its resample and
        # normalization, resize to the fixed square instead.
        assert image_size is not None
        cls = _hf_attr(transformers, "SiglipImageProcessor")
        return cls(
            size={"height": image_size, "width": image_size},
            resample=proc.resample,
            do_rescale=proc.do_rescale,
            rescale_factor=proc.rescale_factor,
            do_normalize=proc.do_normalize,
            image_mean=list(proc.image_mean),
            image_std=list(proc.image_std),
        )
    return proc


def _dtype_of(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _check_folder(path: Path, config: HFVisionEncoderConfig) -> None:
    family = config.family
    if not path.exists():
        raise FileNotFoundError(f"{family} encoder: model folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{family} encoder: {str(path)!r} is not a folder")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{family} encoder: {str(path)!r} has no config.json (not a save_pretrained folder)"
        )
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{family} encoder: cannot read {cfg_file}: {exc}") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type in config.model_types:
        return
    for other, other_cls in _CONFIG_CLASSES.items():
        if model_type in other_cls.model_types:
            raise ValueError(
                f"{str(path)!r} holds a {other} model (model_type {model_type!r}), not a "
                f"{family} vision model; use type = {other!r}"
            )
    raise ValueError(
        f"{str(path)!r} does not hold a {family} vision model: config.json has model_type "
        f"{model_type!r}, expected one of {list(config.model_types)}"
    )


def _vision_config(transformers: Any, config: HFVisionEncoderConfig, path: Path) -> Any:
    config_cls = _hf_attr(transformers, _FAMILIES[config.family].config_cls)
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    section = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else None
    if section is not None:  # dual-tower model: its vision part
        return config_cls.from_dict(section)
    return config_cls.from_pretrained(str(path), local_files_only=True)


def _tower_config(transformers: Any, config: HFVisionEncoderConfig) -> Any:
    config_cls = _hf_attr(transformers, _FAMILIES[config.family].config_cls)
    assert config.tower is not None
    known = set(config_cls().to_dict())
    unknown = sorted(set(config.tower) - known)
    if unknown:
        raise ValueError(
            f"{config.family} tower: unknown vision-config keys {unknown} for {config_cls.__name__}"
        )
    return config_cls(**config.tower)


def _load_weights(
    transformers: Any, model_cls: Any, path: Path, vcfg: Any, config: HFVisionEncoderConfig
) -> Any:
    dtype = _dtype_of(config.dtype) or "auto"
    from packaging.version import Version

    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        model, info = model_cls.from_pretrained(
            str(path),
            config=vcfg,
            local_files_only=True,
            output_loading_info=True,
            **{dtype_kw: dtype},
        )
    except OSError as exc:
        raise FileNotFoundError(
            f"{config.family} encoder: cannot load weights from {str(path)!r}: {exc}"
        ) from exc
    except RuntimeError as exc:  # e.g. size mismatches between config.json and the weights
        raise ValueError(
            f"{config.family} encoder: the weights in {str(path)!r} do not fit its config: {exc}"
        ) from exc
    # the pooling head is deleted by HFVisionEncoder, so its absence does not matter
    missing = sorted(k for k in info.get("missing_keys", ()) if ".head." not in f".{k}")
    if missing:
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        raise ValueError(
            f"{str(path)!r} lacks {len(missing)} weights of the {config.family} vision tower "
            f"({shown}); is it a {config.family} vision model?"
        )
    return model


def build_hf_encoder(config: HFVisionEncoderConfig) -> HFVisionEncoder:
    """Builder named by ``SiglipEncoderConfig`` / ``Siglip2EncoderConfig`` / ``ClipEncoderConfig``.

    Raises:
        ImportError: transformers is not installed (``pip install 'vlm-encoders[hf]'``).
        FileNotFoundError: the folder, its ``config.json`` or its weights are missing.
        ValueError: the folder holds no vision model of this family, unknown
            ``tower`` keys, ``feature_layer`` out of range, or an image processor
            whose output size does not match the tower.
    """
    if not isinstance(config, HFVisionEncoderConfig) or config.family not in _FAMILIES:
        raise TypeError(
            f"build_hf_encoder needs a siglip / siglip2 / clip encoder config, got {type(config)!r}"
        )
    transformers = _import_transformers()
    family = config.family
    model_cls = _hf_attr(transformers, _FAMILIES[family].model_cls)
    dtype = _dtype_of(config.dtype)
    siglip2_size = config.image_size if isinstance(config, Siglip2EncoderConfig) else None
    with _quiet(transformers):
        processor = None
        if config.tower is not None:
            vcfg = _tower_config(transformers, config)
            model = model_cls(vcfg)
        else:
            assert config.path is not None
            path = Path(config.path).expanduser()
            _check_folder(path, config)
            vcfg = _vision_config(transformers, config, path)
            model = (
                model_cls(vcfg)
                if config.from_config
                else _load_weights(transformers, model_cls, path, vcfg, config)
            )
            fixed = siglip2_size
            if family == "siglip2" and fixed is None:
                fixed = math.isqrt(int(vcfg.num_patches)) * int(vcfg.patch_size)
            processor = _folder_processor(transformers, family, path, fixed)
        if dtype is not None:
            model = model.to(dtype)
        if processor is None:
            if family == "siglip2":
                side = siglip2_size or math.isqrt(int(vcfg.num_patches)) * int(vcfg.patch_size)
            else:
                side = int(vcfg.image_size)
            processor = _default_processor(transformers, family, side)
        return HFVisionEncoder(
            model,
            family=family,
            image_processor=processor,
            feature_layer=config.feature_layer,
            post_layernorm=config.post_layernorm,
            image_size=siglip2_size,
        )
