"""The same encoder name as vlm-fixture-good, from another distribution."""

from __future__ import annotations

from typing import Literal

from vlm_config import EncoderConfig


class OtherGridConfig(EncoderConfig):
    type: Literal["fixture_grid"] = "fixture_grid"
