"""The ``VisionEncoder`` contract shared by every encoder: pixels ``(B,3,H,W)`` -> ``(B,N,Dv)``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["PreprocessingInfo", "VisionEncoder"]


@dataclass(frozen=True)
class PreprocessingInfo:
    """What an encoder expects its pixels to look like.

    Attributes:
        image_size: square input resolution ``H == W``.
        mean: per-channel mean subtracted after scaling pixels to ``[0, 1]``.
        std: per-channel std divided by after subtracting ``mean``.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class VisionEncoder(nn.Module):
    """Base of all encoders.

    ``num_tokens`` and ``feature_dim`` are known right after construction (no
    dry-run forward).  ``forward(pixel_values)`` validates the input shape and
    returns ``(B, num_tokens, feature_dim)`` features in the encoder's own dtype
    (the input is cast to it); callers cast the features as they need.

    Subclasses implement ``encode`` (called on validated input) and may
    override ``preprocess``.
    """

    num_tokens: int
    feature_dim: int
    preprocessing: PreprocessingInfo

    def __init__(self, *, num_tokens: int, feature_dim: int, preprocessing: PreprocessingInfo):
        super().__init__()
        if num_tokens < 1 or feature_dim < 1:
            raise ValueError(
                f"num_tokens and feature_dim must be positive, got {num_tokens}, {feature_dim}"
            )
        self.num_tokens = int(num_tokens)
        self.feature_dim = int(feature_dim)
        self.preprocessing = preprocessing

    @property
    def image_size(self) -> int:
        """Square input resolution the encoder accepts."""
        return self.preprocessing.image_size

    @property
    def grid_size(self) -> int | None:
        """Side of the square token grid, or ``None`` when ``num_tokens`` is not a square."""
        side = math.isqrt(self.num_tokens)
        return side if side * side == self.num_tokens else None

    def expected_shape(self) -> str:
        s = self.image_size
        return f"(B, 3, {s}, {s})"

    def check_pixels(self, pixel_values: Any) -> None:
        """Raise ``ValueError`` naming the expected shape unless the input is ``(B, 3, S, S)``."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(
                f"{type(self).__name__} expects a tensor of shape {self.expected_shape()}, "
                f"got {type(pixel_values).__name__}"
            )
        shape = tuple(pixel_values.shape)
        s = self.image_size
        if pixel_values.ndim != 4 or shape[1] != 3 or shape[2] != s or shape[3] != s:
            hint = ""
            if pixel_values.ndim == 5:
                hint = " (fold video frames into the batch before the encoder)"
            raise ValueError(
                f"{type(self).__name__} expects pixel_values of shape {self.expected_shape()}, "
                f"got {shape}{hint}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expects floating-point pixel_values (normalized), "
                f"got dtype {pixel_values.dtype}"
            )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` pixels -> ``(B, num_tokens, feature_dim)`` features."""
        self.check_pixels(pixel_values)
        return self.encode(pixel_values)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder proper, on validated input."""
        raise NotImplementedError

    def preprocess(self, images: Image | Sequence[Image]) -> torch.Tensor:
        """PIL images -> float32 ``(B, 3, S, S)`` pixels ready for ``forward``.

        The base implementation (used by the random encoder): convert to RGB,
        resize to ``S x S`` with PIL's bicubic filter (aspect ratio not kept),
        scale to ``[0, 1]``, then normalize with ``preprocessing.mean/std``.
        """
        try:
            from PIL import Image as PILImage
        except ImportError as exc:  # pragma: no cover - pillow is in the [hf] extra
            raise ImportError("preprocess needs pillow: pip install 'vlm-encoders[hf]'") from exc
        batch = _as_list(images)
        s = self.image_size
        arrays = []
        for image in batch:
            rgb = image.convert("RGB").resize((s, s), PILImage.Resampling.BICUBIC)
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            arrays.append(data.view(s, s, 3))
        pixels = torch.stack(arrays).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        mean = torch.tensor(self.preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def extra_repr(self) -> str:
        return (
            f"num_tokens={self.num_tokens}, feature_dim={self.feature_dim}, "
            f"image_size={self.image_size}"
        )


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        batch = list(images)
    else:
        batch = [images]
    if not batch:
        raise ValueError("preprocess needs at least one image")
    return batch
