"""Parallelism section: data-parallel mesh, activation checkpointing, precision."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from vlm_config.components import StrictModel

DType = Literal["float32", "bfloat16", "float16"]


class ParallelConfig(StrictModel):
    """How a job is spread over processes.

    ``dp_shard = -1`` uses every rank left after ``dp_replicate`` and ``tp``
    (FSDP2 shard dimension); ``dp_replicate > 1`` gives HSDP.
    """

    dp_shard: int = Field(default=-1, description="-1: all remaining ranks")
    dp_replicate: int = Field(default=1, ge=1)
    tp: int = Field(default=1, ge=1)
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    param_dtype: DType = "float32"
    reduce_dtype: DType = "float32"
    reshard_after_forward: bool = True
    compile: bool = Field(
        default=False,
        description="torch.compile every trunk block (Inductor fuses the elementwise work; "
        "the first step pays the compile time)",
    )

    @field_validator("dp_shard")
    @classmethod
    def _dp_shard_valid(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"dp_shard must be -1 (all remaining ranks) or >= 1, got {value}")
        return value
