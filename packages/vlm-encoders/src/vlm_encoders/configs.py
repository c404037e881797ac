"""Torch-free pydantic configs of the first-party encoders (entry-point group ``vlm.encoders``).

This module imports neither torch nor transformers: listing and validating
encoder configs (and predicting their token count / feature width) works in a
process that never builds a model.  Each class names its torch-side builder in
the class variable ``implementation``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from vlm_config import EncoderConfig

__all__ = [
    "ClipEncoderConfig",
    "HFVisionEncoderConfig",
    "RandomEncoderConfig",
    "Siglip2EncoderConfig",
    "SiglipEncoderConfig",
    "read_vision_config",
]


class RandomEncoderConfig(EncoderConfig):
    """Deterministic, weight-free stub encoder for tests and smoke runs.

    Fields:
        num_tokens: tokens ``N`` per image.
        feature_dim: feature width ``Dv``.
        image_size: the square input resolution it accepts.
        seed: seed of its fixed random projections (same seed, same features).
    """

    implementation: ClassVar[str] = "vlm_encoders.random_encoder:build_random_encoder"

    type: Literal["random"] = "random"
    num_tokens: int = Field(default=64, ge=1)
    feature_dim: int = Field(default=192, ge=1)
    image_size: int = Field(default=32, ge=1)
    seed: int = 0

    def predicted_num_tokens(self) -> int:
        return self.num_tokens

    def predicted_feature_dim(self) -> int:
        return self.feature_dim


def read_vision_config(path: str | Path) -> dict[str, Any] | None:
    """The vision-config section of ``path/config.json`` read with ``json`` (no torch).

    A dual-tower folder (``SiglipModel``, ``CLIPModel``, ...) gives its
    ``vision_config`` section; a vision-only folder gives the whole file.
    Returns ``None`` when the file is missing or unreadable.
    """
    try:
        raw = json.loads((Path(path).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    section = raw.get("vision_config")
    if isinstance(section, dict):
        return section
    return raw


_TOWER_INT_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_patches",
    "num_channels",
)


class HFVisionEncoderConfig(EncoderConfig):
    """Common config of the Hugging Face vision towers (``siglip``, ``siglip2``, ``clip``).

    Exactly one of ``path`` and ``tower`` is given.

    Fields:
        path: local folder holding a ``save_pretrained`` model: a vision-only
            model (``SiglipVisionModel``, ...) or a full dual-tower model
            (``SiglipModel``, ``CLIPModel``, ...) whose vision part is used.
            Nothing is ever downloaded.
        tower: inline Hugging Face vision-config kwargs (e.g. ``{"hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
            "image_size": 32, "patch_size": 8}``) building a random-init tower
            without any folder, for from-scratch training.
        from_config: with ``path``, build a random-init tower from the folder's
            config alone (weights are not read).
        feature_layer: which entry of transformers' ``hidden_states`` tuple is
            the output, with its indexing: ``0`` = embeddings, ``i`` = after
            encoder layer ``i``, ``-1`` = last layer, ``-2`` = penultimate (LLaVA).
            Layers after it are dropped from the module at build time.
        post_layernorm: apply the tower's ``post_layernorm`` to the selected
            layer.  With ``feature_layer=-1`` this gives SigLIP's
            ``last_hidden_state`` (PaliGemma-style); off by default, which
            gives the raw ``hidden_states[feature_layer]`` (LLaVA-style, and
            CLIP's ``last_hidden_state``).
        dtype: parameter dtype of the tower.  ``None``: as saved in the folder
            (``dtype="auto"``) when loading weights, float32 for random init.
    """

    family: ClassVar[str] = ""
    #: ``model_type`` values accepted in ``config.json`` (vision-only and dual-tower).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: transformers' defaults of the vision config keys the predictions read.
    tower_defaults: ClassVar[dict[str, int]] = {}
    #: whether the tower prepends a CLS token that the encoder strips.
    has_cls_token: ClassVar[bool] = False
    implementation: ClassVar[str] = "vlm_encoders.hf:build_hf_encoder"

    type: str
    path: str | None = None
    tower: dict[str, Any] | None = None
    from_config: bool = False
    feature_layer: int = -1
    post_layernorm: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    @field_validator("tower")
    @classmethod
    def _tower_ints(cls, tower: dict[str, Any] | None) -> dict[str, Any] | None:
        if tower is None:
            return None
        if "vision_config" in tower:
            raise ValueError(
                "tower takes the vision-config kwargs themselves, not a 'vision_config'"
            )
        for key in _TOWER_INT_KEYS:
            if key in tower:
                value = tower[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"tower[{key!r}] must be a positive int, got {value!r}")
        return tower

    @model_validator(mode="after")
    def _source(self) -> HFVisionEncoderConfig:
        if (self.path is None) == (self.tower is None):
            raise ValueError(
                "give exactly one of 'path' (a local model folder) and 'tower' "
                "(inline vision-config kwargs for a random-init tower)"
            )
        if self.from_config and self.path is None:
            raise ValueError("'from_config' needs 'path' (a 'tower' is always random-init)")
        if self.tower is not None:
            layers = self._get(self.tower, "num_hidden_layers")
            if layers is not None and not -(layers + 1) <= self.feature_layer <= layers:
                raise ValueError(
                    f"feature_layer={self.feature_layer} is out of range for a tower of "
                    f"{layers} layers (hidden_states has {layers + 1} entries: "
                    f"{-(layers + 1)}..{layers})"
                )
        return self

    # -- torch-free predictions -------------------------------------------------

    def vision_config_dict(self) -> dict[str, Any] | None:
        """The vision-config kwargs (``tower`` or the folder's), ``None`` if unreadable."""
        if self.tower is not None:
            return dict(self.tower)
        assert self.path is not None
        return read_vision_config(self.path)

    def _get(self, cfg: dict[str, Any], key: str) -> int | None:
        value = cfg.get(key, self.tower_defaults.get(key))
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return None

    def predicted_image_size(self) -> int | None:
        """The square input resolution, or ``None`` until build."""
        cfg = self.vision_config_dict()
        return None if cfg is None else self._get(cfg, "image_size")

    def predicted_num_tokens(self) -> int | None:
        """``(image_size // patch_size) ** 2`` (CLIP's CLS token removed); ``None`` if unknown."""
        cfg = self.vision_config_dict()
        if cfg is None:
            return None
        image_size = self.predicted_image_size()
        patch = self._get(cfg, "patch_size")
        if image_size is None or patch is None:
            return None
        return (image_size // patch) ** 2

    def predicted_feature_dim(self) -> int | None:
        """The tower's ``hidden_size``; ``None`` if unknown."""
        cfg = self.vision_config_dict()
        return None if cfg is None else self._get(cfg, "hidden_size")


class SiglipEncoderConfig(HFVisionEncoderConfig):
    """SigLIP vision tower (``SiglipVisionModel``); no CLS token."""

    family: ClassVar[str] = "siglip"
    model_types: ClassVar[tuple[str, ...]] = ("siglip", "siglip_vision_model")
    tower_defaults: ClassVar[dict[str, int]] = {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "image_size": 224,
        "patch_size": 16,
    }
    type: Literal["siglip"] = "siglip"


class ClipEncoderConfig(HFVisionEncoderConfig):
    """CLIP vision tower (``CLIPVisionModel``); its CLS token is stripped from the output."""

    family: ClassVar[str] = "clip"
    model_types: ClassVar[tuple[str, ...]] = ("clip", "clip_vision_model")
    tower_defaults: ClassVar[dict[str, int]] = {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "image_size": 224,
        "patch_size": 32,
    }
    has_cls_token: ClassVar[bool] = True
    type: Literal["clip"] = "clip"


class Siglip2EncoderConfig(HFVisionEncoderConfig):
    """SigLIP2 (NaFlex) vision tower (``Siglip2VisionModel``) run on a fixed square grid.

    SigLIP2 has no ``image_size``: its position embeddings form a
    ``sqrt(num_patches)`` square that transformers resizes to each image's
    patch grid.  This encoder takes square ``(B, 3, image_size, image_size)``
    pixels, patchifies them itself and passes an all-ones
    ``pixel_attention_mask`` and ``spatial_shapes = (g, g)``.

    Fields:
        image_size: the fixed square input resolution; a multiple of
            ``patch_size``.  ``None``: ``sqrt(num_patches) * patch_size`` (the
            native grid, where the position embeddings are used unresized).
    """

    family: ClassVar[str] = "siglip2"
    model_types: ClassVar[tuple[str, ...]] = ("siglip2", "siglip2_vision_model")
    tower_defaults: ClassVar[dict[str, int]] = {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_patches": 256,
        "patch_size": 16,
    }
    type: Literal["siglip2"] = "siglip2"
    image_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _image_size_fits_patches(self) -> Siglip2EncoderConfig:
        if self.tower is not None:
            patch = self._get(self.tower, "patch_size")
            if self.image_size is not None and patch is not None and self.image_size % patch:
                raise ValueError(
                    f"image_size={self.image_size} must be a multiple of patch_size={patch}"
                )
            if self.image_size is None:
                num_patches = self._get(self.tower, "num_patches")
                if num_patches is not None and math.isqrt(num_patches) ** 2 != num_patches:
                    raise ValueError(
                        f"num_patches={num_patches} is not a perfect square; set image_size "
                        "to choose the square grid"
                    )
        return self

    def predicted_image_size(self) -> int | None:
        if self.image_size is not None:
            return self.image_size
        cfg = self.vision_config_dict()
        if cfg is None:
            return None
        num_patches = self._get(cfg, "num_patches")
        patch = self._get(cfg, "patch_size")
        if num_patches is None or patch is None or math.isqrt(num_patches) ** 2 != num_patches:
            return None
        return math.isqrt(num_patches) * patch
