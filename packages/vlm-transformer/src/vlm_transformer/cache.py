"""Key/value cache for incremental decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["KVCache", "LayerKVCache", "StaticKVCache", "StaticLayerKVCache", "StepPositions"]


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


def step_positions(
    start: Tensor, new_len: int, key_valid: Tensor | None, slots: Tensor | None = None
) -> tuple[Tensor, Tensor | int]:
    """Rotary positions ``(B, new_len)`` of new slots after ``start (B,)`` real tokens, and
    how far each row's next position advances: by ``new_len`` when every new slot is real,
    else by the row's real slots (a padding slot repeats its row's last position, clamped
    at 0).  ``slots`` is ``arange(new_len)`` when the caller keeps one."""
    if key_valid is None:
        offsets = torch.arange(new_len, device=start.device) if slots is None else slots
        return start[:, None] + offsets[None, :], new_len
    counts = key_valid.long().cumsum(dim=1)
    return (start[:, None] + counts - 1).clamp_min(0), counts[:, -1]


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

    def _check_step(self, batch: int, new_len: int, key_valid: Tensor | None) -> None:
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

    def begin_step(
        self, batch: int, new_len: int, device: torch.device, key_valid: Tensor | None = None
    ) -> StepPositions:
        """Register ``new_len`` new slots (``key_valid (B, new_len)`` bool or ``None`` = all
        real) and return their positions and the validity of all keys.

        Raises:
            ValueError: batch size differs from earlier steps, or ``key_valid`` is malformed.
        """
        self._check_step(batch, new_len, key_valid)
        start = (
            torch.zeros(batch, dtype=torch.long, device=device)
            if self.next_position is None
            else self.next_position
        )
        positions, advance = step_positions(start, new_len, key_valid)
        self.next_position = start + advance
        if key_valid is None:
            if self.key_valid is not None:
                ones = torch.ones(batch, new_len, dtype=torch.bool, device=device)
                self.key_valid = torch.cat((self.key_valid, ones), dim=1)
        else:
            past = (
                torch.ones(batch, self.seq_len, dtype=torch.bool, device=device)
                if self.key_valid is None
                else self.key_valid
            )
            self.key_valid = torch.cat((past, key_valid), dim=1)
        past_len = self.seq_len
        self.seq_len += new_len
        return StepPositions(positions=positions, key_valid=self.key_valid, past_len=past_len)


class StaticLayerKVCache(LayerKVCache):
    """Keys and values of one layer in preallocated ``(B, Hkv, max_len, hd)`` buffers.

    :meth:`update` writes the new slots in place (no concatenation, no re-allocation)
    and returns views of the filled part, ``(B, Hkv, L + S_new, hd)``; in the static
    decode mode of its :class:`StaticKVCache` (``cache.write_index`` set) it writes at
    that index tensor and returns the whole buffers (``max_len`` keys; the slots not
    written yet are masked by the caller), so every step has the same shapes.
    ``k`` / ``v`` are the filled views (``None`` before the first update).
    """

    def __init__(self, owner: StaticKVCache) -> None:
        super().__init__()
        self._owner = owner
        self.k_buffer: Tensor | None = None
        self.v_buffer: Tensor | None = None

    @property  # type: ignore[override]
    def k(self) -> Tensor | None:
        return None if self.k_buffer is None else self.k_buffer[:, :, : self._owner.seq_len]

    @k.setter
    def k(self, value: Tensor | None) -> None:
        if value is not None:
            raise AttributeError("StaticLayerKVCache.k is read-only (use update)")

    @property  # type: ignore[override]
    def v(self) -> Tensor | None:
        return None if self.v_buffer is None else self.v_buffer[:, :, : self._owner.seq_len]

    @v.setter
    def v(self, value: Tensor | None) -> None:
        if value is not None:
            raise AttributeError("StaticLayerKVCache.v is read-only (use update)")

    def grow(self, size: int) -> None:
        """Copy the buffers into new ones of ``size >= max_len`` slots."""
        for name in ("k_buffer", "v_buffer"):
            old = getattr(self, name)
            if old is not None:
                buf = old.new_zeros(*old.shape[:2], size, old.shape[3])
                buf[:, :, : old.shape[2]] = old
                setattr(self, name, buf)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v (B, Hkv, S_new, hd)`` at the slots the owner's step registered.

        Returns:
            ``(B, Hkv, L + S_new, hd)`` views, or the full ``(B, Hkv, max_len, hd)``
            buffers in static decode mode.

        Raises:
            ValueError: the slots were not registered (``begin_step``) or the buffers'
                batch / head layout differs from ``k``'s.
        """
        owner = self._owner
        if self.k_buffer is None or self.v_buffer is None:
            b, h, _, d = k.shape
            self.k_buffer = k.new_zeros(b, h, owner.max_len, d)
            self.v_buffer = v.new_zeros(b, h, owner.max_len, d)
        kb, vb = self.k_buffer, self.v_buffer
        index = owner.write_index
        if index is not None:
            kb.index_copy_(2, index, k.to(kb.dtype))
            vb.index_copy_(2, index, v.to(vb.dtype))
            return kb, vb
        end = owner.seq_len
        start = end - k.shape[2]
        if start < 0 or end > owner.max_len or kb.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"StaticKVCache: cannot write {tuple(k.shape)} at slots [{start}, {end}) of a "
                f"{tuple(kb.shape)} buffer (max_len={owner.max_len})"
            )
        kb[:, :, start:end] = k
        vb[:, :, start:end] = v
        return kb[:, :, :end], vb[:, :, :end]


class StaticKVCache(KVCache):
    """A :class:`KVCache` with room for ``max_len`` slots, preallocated and written in place.

    A drop-in for ``Transformer.forward(..., cache=...)``: the same positions, key
    validity and keys/values as :class:`KVCache` (bitwise), but each layer's buffers are
    allocated once (at the first update, ``(B, Hkv, max_len, hd)`` in the keys' dtype)
    and the key validity lives in one ``(B, max_len)`` bool buffer, so a decode step
    allocates nothing for the cache.  ``key_valid`` / ``next_position`` are views or
    tensors updated in place.

    Static decode mode (what a compiled decode step uses, see
    :meth:`begin_static_step`): ``write_index`` is a ``(S_new,)`` long tensor of the
    slots to write, and layers return the whole buffers, so every step has identical
    shapes.

    Args:
        max_len: the slots to allocate (prompt + prefix + decoded tokens).  A forward
            that needs more re-allocates every buffer once (to at least twice the size),
            so an unexpected step is slow, never wrong.

    Raises:
        ValueError: ``max_len < 1``; in :meth:`begin_step` what :meth:`KVCache.begin_step`
            raises.
    """

    def __init__(self, max_len: int) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"StaticKVCache max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.write_index: Tensor | None = None
        self._valid_buffer: Tensor | None = None
        self._slots: Tensor | None = None

    def layer(self, name: str) -> LayerKVCache:
        """The (created on first use) :class:`StaticLayerKVCache` of layer ``name``."""
        if name not in self.layers:
            self.layers[name] = StaticLayerKVCache(self)
        return self.layers[name]

    def _valid(self, batch: int, device: torch.device) -> Tensor:
        if self._valid_buffer is None:
            buf = torch.zeros(batch, self.max_len, dtype=torch.bool, device=device)
            buf[:, : self.seq_len] = True
            self._valid_buffer = buf
        return self._valid_buffer

    def begin_step(
        self, batch: int, new_len: int, device: torch.device, key_valid: Tensor | None = None
    ) -> StepPositions:
        """:meth:`KVCache.begin_step` without re-allocation: the validity of the new slots
        is written into the ``(B, max_len)`` buffer, positions advance in place.

        Raises:
            ValueError: as :meth:`KVCache.begin_step`.
        """
        if self.seq_len + new_len > self.max_len:
            self._grow(self.seq_len + new_len)
        self._check_step(batch, new_len, key_valid)
        if self.next_position is None:
            self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        past_len = self.seq_len
        end = past_len + new_len
        positions, advance = step_positions(
            self.next_position, new_len, key_valid, self._arange(new_len, device)
        )
        self.next_position += advance
        if key_valid is not None or self._valid_buffer is not None:
            buf = self._valid(batch, device)
            if key_valid is None:
                buf[:, past_len:end] = True
            else:
                buf[:, past_len:end] = key_valid
            self.key_valid = buf[:, :end]
        self.seq_len = end
        return StepPositions(positions=positions, key_valid=self.key_valid, past_len=past_len)

    def _grow(self, needed: int) -> None:
        """Re-allocate every buffer with room for ``max(needed, 2 * max_len)`` slots (a
        forward that adds more slots than planned, e.g. a decode context with a prefix)."""
        size = max(needed, 2 * self.max_len)
        for layer in self.layers.values():
            if isinstance(layer, StaticLayerKVCache):
                layer.grow(size)
        if self._valid_buffer is not None:
            old = self._valid_buffer
            self._valid_buffer = old.new_zeros(old.shape[0], size)
            self._valid_buffer[:, : self.max_len] = old
            self.key_valid = self._valid_buffer[:, : self.seq_len]
        self.max_len = size

    def _arange(self, n: int, device: torch.device) -> Tensor:
        if n == 1:
            if self._slots is None or self._slots.device != device:
                self._slots = torch.zeros(1, dtype=torch.long, device=device)
            return self._slots
        return torch.arange(n, device=device)

    def begin_static_step(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Register one new slot per row for a fixed-shape decode step.

        Sets ``write_index`` (layers then write there and return whole buffers) and marks
        the slot valid.  Call :meth:`end_static_step` after the forward.

        Returns:
            ``positions (B, 1)`` long, ``write_index (1,)`` long and the key validity
            ``(B, max_len)`` bool over all slots (False for slots not written yet).

        Raises:
            ValueError: the cache was never filled (no prefill).
        """
        if self.next_position is None:
            raise ValueError("StaticKVCache: a static step needs a prefilled cache")
        if self.seq_len >= self.max_len:
            self._grow(self.seq_len + 1)
        buf = self._valid(batch, device)
        slot = self.seq_len
        buf[:, slot] = True
        positions = self.next_position[:, None].clone()
        self.next_position += 1
        self.write_index = torch.full((1,), slot, dtype=torch.long, device=device)
        self.seq_len = slot + 1
        self.key_valid = buf[:, : self.seq_len]
        return positions, self.write_index, buf

    def end_static_step(self) -> None:
        """Leave static decode mode (layers write by slices again)."""
        self.write_index = None
