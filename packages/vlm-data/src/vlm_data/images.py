"""Image decoding and pixel helpers: :func:`load_image`, :func:`to_rgb`,
:func:`random_shift`, :func:`pad_clip`.

:func:`load_image` turns any image file Pillow reads into a fully decoded 8-bit RGB
image, or raises a :class:`~vlm_data.DataError` naming the file and what is wrong:
missing, not an image, truncated, or larger than Pillow's decompression-bomb limit.
:func:`to_rgb` converts the modes a plain ``convert("RGB")`` gets wrong: 16/32-bit grey
(``I;16``, ``I``) is scaled to 8 bits by its own range (a 12-bit scan keeps its
contrast instead of clipping to white), ``F`` likewise, palette images with
transparency go through RGBA, and CMYK is converted by Pillow's CMYK->RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from vlm_data.errors import DataError

__all__ = ["load_image", "pad_clip", "random_shift", "to_rgb"]


def to_rgb(image: Any) -> Any:
    """A PIL image in 8-bit ``RGB``.

    ``I;16*`` / ``I`` / ``F`` (high bit depth grey) are scaled linearly from their own
    ``[min, max]`` to ``[0, 255]`` (a constant image becomes black); ``P`` / ``PA`` and
    ``LA`` / ``RGBA`` are flattened onto black through RGBA; ``CMYK`` and ``YCbCr`` use
    Pillow's conversions.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        grey = Image.fromarray(np.round(scaled).astype(np.uint8), "L")
        return grey.convert("RGB")
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, *, data: IO[bytes] | None = None, record: str = "") -> Any:
    """Open an image with PIL as 8-bit RGB (fully decoded before it is returned).

    Args:
        path: the file (or, with ``data``, the name to report, e.g. a tar member).
        data: read from this binary stream instead of ``path``.
        record: where the image was listed (``"train.jsonl:12"``), added to errors.

    Raises:
        DataError: the file is missing, is not a readable image, is truncated, or has
            more pixels than Pillow's decompression-bomb limit
            (``2 * PIL.Image.MAX_IMAGE_PIXELS``); the message names the file (and the
            record).
    """
    from PIL import Image

    where = f"{path} ({record})" if record else f"{path}"
    if data is None and not Path(path).is_file():
        raise DataError(f"image file not found: {where}")
    try:
        with Image.open(data if data is not None else Path(path)) as image:
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"cannot read image {where}: too large to decode safely: {exc} "
            f"(Pillow's PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; raise it "
            "only for images you trust)"
        ) from exc
    except OSError as exc:  # incl. UnidentifiedImageError: not an image format PIL knows
        if "truncated" in str(exc).replace(str(path), ""):
            raise DataError(
                f"cannot read image {where}: the file is truncated (incomplete copy or "
                f"download?): {exc}"
            ) from exc
        raise DataError(f"cannot read image {where}: {exc}") from exc
    except (ValueError, SyntaxError) as exc:  # malformed headers
        raise DataError(f"cannot read image {where}: {exc}") from exc


def random_shift(
    pixel_values: Tensor, max_shift: int, unit: int, fill: float, generator: torch.Generator
) -> Tensor:
    """Translate each image of ``(..., 3, H, W)`` by up to ``max_shift * unit`` pixels
    (a whole number of ``unit`` steps) in x and y, filling with ``fill``; the shifts are
    drawn from ``generator`` in image order."""
    if max_shift <= 0:
        return pixel_values
    shape = pixel_values.shape
    flat = pixel_values.reshape(-1, *shape[-3:])
    pad = max_shift * unit
    padded = torch.nn.functional.pad(flat, (pad, pad, pad, pad), value=fill)
    shifts = torch.randint(-max_shift, max_shift + 1, (flat.shape[0], 2), generator=generator)
    h, w = shape[-2], shape[-1]
    out = torch.empty_like(flat)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        y0, x0 = pad - dy * unit, pad - dx * unit
        out[i] = padded[i, :, y0 : y0 + h, x0 : x0 + w]
    return out.view(shape)


def pad_clip(frames: Tensor, frames_per_clip: int) -> tuple[Tensor, Tensor]:
    """``(n, 3, H, W)`` -> ``(F, 3, H, W)`` zero-padded and its ``(F,)`` frame mask.

    Raises:
        DataError: ``n`` is 0 or more than ``frames_per_clip``.
    """
    n = frames.shape[0]
    if n > frames_per_clip:
        raise DataError(f"a clip has {n} frames, more than frames_per_clip={frames_per_clip}")
    if n < 1:
        raise DataError("a clip needs at least one frame")
    out = frames.new_zeros((frames_per_clip, *frames.shape[1:]))
    out[:n] = frames
    mask = torch.zeros(frames_per_clip, dtype=torch.bool)
    mask[:n] = True
    return out, mask
