"""Key/value cache for incremental decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["KVCache", "LayerKVCache", "StepPositions"]


class LayerKVCache:
    """Keys and values of one attention layer, ``(B, Hkv, L, hd)`` each (grown by concat)."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v (B, Hkv, S_new, hd)``; return all keys/values ``(B, Hkv, L+S_new, hd)``."""
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        return self.k, self.v


@dataclass(frozen=True)
class StepPositions:
    """What :meth:`KVCache.begin_step` returns for one forward.

    Attributes:
        positions: ``(B, S_new)`` long rotary positions of the new tokens.
        key_valid: ``(B, L + S_new)`` bool validity of all keys, or ``None`` if no key
            was ever marked as padding.
        past_len: ``L``, number of cached slots before this step.
    """

    positions: Tensor
    key_valid: Tensor | None
    past_len: int


class KVCache:
    """Cache for a whole model: per-layer K/V plus per-row key validity and positions.

    ``Transformer.forward(..., cache=cache)`` calls :meth:`begin_step` once per forward,
    then every attention layer calls ``cache.layer(name).update(k, v)`` (``name`` is the
    trunk's layer key, e.g. ``"3"``; trunks with extra layers choose their own keys).
    ``state`` is a free dict for arch data worth keeping across steps (e.g. projected
    image K/V of cross-attention layers).

    Slots are never removed: a padded prompt slot stays masked for the whole decode.
    Positions continue per row from the number of *real* tokens seen so far, so a
    left-padded row gets the same positions as the unpadded sequence.
    """

    def __init__(self) -> None:
        self.layers: dict[str, LayerKVCache] = {}
        self.state: dict[str, Any] = {}
        self.seq_len = 0
        self.key_valid: Tensor | None = None
        self.next_position: Tensor | None = None

    def layer(self, name: str) -> LayerKVCache:
        """The (created on first use) cache of layer ``name``."""
        if name not in self.layers:
            self.layers[name] = LayerKVCache()
        return self.layers[name]

    def begin_step(
        self, batch: int, new_len: int, device: torch.device, key_valid: Tensor | None = None
    ) -> StepPositions:
        """Register ``new_len`` new slots (``key_valid (B, new_len)`` bool or ``None`` = all
        real) and return their positions and the validity of all keys.

        Raises:
            ValueError: batch size differs from earlier steps, or ``key_valid`` is malformed.
        """
        if self.next_position is not None and self.next_position.shape[0] != batch:
            raise ValueError(
                f"KVCache holds batch {self.next_position.shape[0]}, forward has batch {batch}"
            )
        if key_valid is not None and (
            key_valid.dtype != torch.bool or tuple(key_valid.shape) != (batch, new_len)
        ):
            raise ValueError(
                f"key_valid must be ({batch}, {new_len}) bool, got "
                f"{tuple(key_valid.shape)} {key_valid.dtype}"
            )
        start = (
            torch.zeros(batch, dtype=torch.long, device=device)
            if self.next_position is None
            else self.next_position
        )
        if key_valid is None:
            positions = start[:, None] + torch.arange(new_len, device=device)[None, :]
            self.next_position = start + new_len
            if self.key_valid is not None:
                ones = torch.ones(batch, new_len, dtype=torch.bool, device=device)
                self.key_valid = torch.cat((self.key_valid, ones), dim=1)
        else:
            counts = key_valid.long().cumsum(dim=1)
            positions = (start[:, None] + counts - 1).clamp_min(0)
            self.next_position = start + counts[:, -1]
            past = (
                torch.ones(batch, self.seq_len, dtype=torch.bool, device=device)
                if self.key_valid is None
                else self.key_valid
            )
            self.key_valid = torch.cat((past, key_valid), dim=1)
        past_len = self.seq_len
        self.seq_len += new_len
        return StepPositions(positions=positions, key_valid=self.key_valid, past_len=past_len)
