"""An adapter config with its own validated field, and an encoder config."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from vlm_config import AdapterConfig, EncoderConfig


class FixturePoolConfig(AdapterConfig):
    type: Literal["fixture_pool"] = "fixture_pool"
    stride: int = Field(default=2, ge=1, le=16, description="keep every stride-th token")
    implementation: ClassVar[str] = "vlm_fixture_good.impl:build"

    def predicted_num_tokens(self, num_input_tokens: int) -> int:
        return -(-num_input_tokens // self.stride)


class FixtureGridConfig(EncoderConfig):
    type: Literal["fixture_grid"] = "fixture_grid"
    grid: int = 4
    implementation: ClassVar[str] = "vlm_fixture_good.impl:build"

    def predicted_num_tokens(self) -> int:
        return self.grid * self.grid
