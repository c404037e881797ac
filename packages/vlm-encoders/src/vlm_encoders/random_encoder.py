"""The ``random`` encoder: a deterministic, weight-free stub for tests and smoke runs."""

from __future__ import annotations

import torch

from vlm_encoders.base import PreprocessingInfo, VisionEncoder
from vlm_encoders.configs import RandomEncoderConfig

__all__ = ["RandomEncoder", "build_random_encoder"]

_MAX_GRID = 16


def _patch_side(image_size: int) -> int:
    """Patch side ``p``: the image is cut into a ``g x g`` grid, ``g`` = largest divisor <= 16."""
    grid = max(d for d in range(1, min(image_size, _MAX_GRID) + 1) if image_size % d == 0)
    return image_size // grid


class RandomEncoder(VisionEncoder):
    """Fixed random features of the pixels; no parameters.

    The image is cut into a ``g x g`` grid of ``p x p`` patches (``g`` the largest
    divisor of ``image_size`` not above 16).  Each patch is projected to
    ``feature_dim`` and squashed (``tanh``), then the ``g*g`` patch features are
    mixed into ``num_tokens`` tokens by a fixed random matrix and a fixed
    per-token offset is added::

        out = mix @ tanh(patches @ w_in) + pos

    ``w_in``, ``mix`` and ``pos`` are non-persistent buffers drawn from a CPU
    ``torch.Generator`` seeded with ``seed``: the same seed gives the same
    features on every device, different images give different features, and
    nothing is saved in a state dict.  The whole batch is processed at once.
    ``.to(device/dtype)`` moves and casts the buffers; features come out in the
    buffers' dtype.  After meta-device construction call ``reset_parameters()``.
    """

    w_in: torch.Tensor
    mix: torch.Tensor
    pos: torch.Tensor

    def __init__(self, *, num_tokens: int, feature_dim: int, image_size: int, seed: int = 0):
        super().__init__(
            num_tokens=num_tokens,
            feature_dim=feature_dim,
            preprocessing=PreprocessingInfo(
                image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
            ),
        )
        self.seed = int(seed)
        self.patch = _patch_side(image_size)
        self.grid = image_size // self.patch
        w_in, mix, pos = self._draw()
        self.register_buffer("w_in", w_in, persistent=False)
        self.register_buffer("mix", mix, persistent=False)
        self.register_buffer("pos", pos, persistent=False)

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        fan_in = 3 * self.patch * self.patch
        num_patches = self.grid * self.grid
        w_in = torch.randn(fan_in, self.feature_dim, generator=gen) / fan_in**0.5
        mix = torch.randn(self.num_tokens, num_patches, generator=gen) / num_patches**0.5
        pos = 0.1 * torch.randn(self.num_tokens, self.feature_dim, generator=gen)
        return w_in, mix, pos

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Regenerate the buffers from ``seed`` in place (e.g. after ``to_empty``)."""
        for buf, value in zip((self.w_in, self.mix, self.pos), self._draw(), strict=True):
            buf.copy_(value)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b = pixel_values.shape[0]
        g, p = self.grid, self.patch
        x = pixel_values.to(self.w_in.dtype)
        patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
        feats = torch.tanh(patches @ self.w_in)  # (B, P, D)
        return torch.matmul(self.mix, feats) + self.pos  # (N, P) @ (B, P, D) -> (B, N, D)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}, patch={self.patch}"


def build_random_encoder(config: RandomEncoderConfig) -> RandomEncoder:
    """Builder named by ``RandomEncoderConfig.implementation``."""
    if not isinstance(config, RandomEncoderConfig):
        raise TypeError(f"build_random_encoder needs a RandomEncoderConfig, got {type(config)!r}")
    return RandomEncoder(
        num_tokens=config.num_tokens,
        feature_dim=config.feature_dim,
        image_size=config.image_size,
        seed=config.seed,
    )
