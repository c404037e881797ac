"""Training-loop section of a job (optimiser, schedule, checkpoints, logging)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vlm_config.components import StrictModel


class TrainConfig(StrictModel):
    """Optimisation and bookkeeping of a training run.

    The learning rate warms up linearly for ``warmup_steps`` then follows a
    cosine down to ``lr * min_lr_ratio`` at ``steps``.
    """

    seed: int = 0
    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=32, ge=1, description="global batch per optimiser step")
    grad_accum_steps: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(default=10, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    autocast_bf16: bool = False
    aux_loss_weights: dict[str, float] = Field(
        default_factory=dict, description="weight per trunk auxiliary loss name"
    )
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    output_dir: str = "runs/default"
    resume: bool = Field(default=True, description="resume from the latest checkpoint")
    eval_every: int | None = Field(default=None, ge=1, description="held-out eval every N steps")
    eval_at_end: bool = True
    progress: bool = Field(default=True, description="tqdm progress bar on the main rank")
    export: bool = Field(default=True, description="export a consolidated model at the end")
    num_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op CPU threads; None: torch's default"
    )
    feature_cache: Literal["auto", "off", "on"] = Field(
        default="auto",
        description=(
            "precompute a frozen vision encoder's features once and train from them: "
            "'auto' when valid (encoder frozen at every freeze stage and weighted, "
            "augmentation off, map-style data), 'on' = an error when not valid, 'off'"
        ),
    )
    feature_cache_dir: str | None = Field(
        default=None, description="where feature caches live; None: <output_dir>/feature_cache"
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})"
            )
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"grad_accum_steps ({self.grad_accum_steps}) must divide "
                f"batch_size ({self.batch_size})"
            )
        return self
