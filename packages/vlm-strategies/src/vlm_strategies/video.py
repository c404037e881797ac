"""Video helpers: fold frames into the batch, expand frame masks, frame positions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FramePositionEmbedding", "expand_frame_mask", "fold_frames"]


def fold_frames(pixel_values: Tensor, frames_per_clip: int) -> tuple[Tensor, int]:
    """``(B,3,H,W)`` (one frame) or ``(B,F,3,H,W)`` -> ``((B*F,3,H,W), F)``.

    Raises:
        ValueError: wrong rank, or ``F != frames_per_clip`` (naming both numbers).
    """
    if pixel_values.ndim == 4:
        frames = 1
        folded = pixel_values
    elif pixel_values.ndim == 5:
        frames = pixel_values.shape[1]
        folded = pixel_values.flatten(0, 1)
    else:
        raise ValueError(
            "pixel_values must be (B, 3, H, W) images or (B, F, 3, H, W) clips, got shape "
            f"{tuple(pixel_values.shape)}"
        )
    if frames != frames_per_clip:
        raise ValueError(
            f"got clips of {frames} frame(s) but the model was built with "
            f"frames_per_clip={frames_per_clip}; pad or trim clips to {frames_per_clip} frames "
            "(and pass frame_mask) or rebuild with arch.frames_per_clip"
        )
    return folded, frames


def expand_frame_mask(
    frame_mask: Tensor | None, batch: int, frames: int, num_tokens: int
) -> Tensor | None:
    """``frame_mask (B, F)`` -> per-visual-token validity ``(B, num_tokens)`` bool.

    Returns ``None`` when ``frame_mask`` is ``None`` (every frame real).

    Raises:
        ValueError: ``frame_mask`` not ``(B, F)``, or ``num_tokens`` not divisible by ``F``.
    """
    if frame_mask is None:
        return None
    if tuple(frame_mask.shape) != (batch, frames):
        raise ValueError(
            f"frame_mask must be (B, F) = ({batch}, {frames}), got {tuple(frame_mask.shape)}"
        )
    if num_tokens % frames:
        raise ValueError(f"{num_tokens} visual tokens cannot be split evenly over {frames} frames")
    per_frame = num_tokens // frames
    return frame_mask.to(torch.bool).repeat_interleave(per_frame, dim=1)


class FramePositionEmbedding(nn.Module):
    """A learned ``(F, D)`` embedding added to every visual token of frame ``f``.

    Cross-attention keys/values carry no rotary positions, so without it a clip of
    digits 3-1-4 and one of 4-1-3 give the text the same set of keys.

    ``forward(tokens (B, F, M, D)) -> (B, F, M, D)``.
    """

    def __init__(self, frames: int, dim: int, std: float = 0.02) -> None:
        super().__init__()
        self.std = std
        self.weight = nn.Parameter(torch.empty(frames, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 4 or tokens.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"FramePositionEmbedding expects (B, {self.weight.shape[0]}, M, D), "
                f"got {tuple(tokens.shape)}"
            )
        return tokens + self.weight[None, :, None, :].to(tokens.dtype)
