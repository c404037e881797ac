"""Base classes of the encoder, adapter and arch plugin groups (the dataset base,
:class:`vlm_config.DatasetConfig`, is in :mod:`vlm_config.data`).

Every plugin's config class subclasses one of these bases, sets its
discriminator (``type`` or ``arch``) to a single ``Literal`` equal to its
entry-point name, and names its torch-side implementation in the class
variable ``implementation`` (``"package.module:callable"``), which is imported
only when a model is built.  Nothing here imports torch.
"""

from __future__ import annotations

import fnmatch
import itertools
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from vlm_config.model import ModelConfig


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ConfigFieldError(ValueError):
    """A :meth:`ComponentConfig.check_model` failure that belongs to one field.

    ``JobConfig`` reports it at the path ``<section>.<field>`` (for example
    ``arch.cross_attention_every_n_layers``); a plain ``ValueError`` raised by the hook
    is reported at the section (``arch``).

    Attributes:
        field: the name of the offending field of the component config.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ComponentConfig(StrictModel):
    """Common base of plugin configs.

    Class variables:
        discriminator: name of the field holding the plugin name.
        implementation: ``"module:callable"`` import string of the torch-side builder.
    """

    discriminator: ClassVar[str] = "type"
    implementation: ClassVar[str] = ""

    @classmethod
    def plugin_name(cls) -> str:
        """The discriminator default of this class, which must equal its entry-point name."""
        field = cls.model_fields.get(cls.discriminator)
        if field is None or not isinstance(field.default, str):
            raise TypeError(
                f"{cls.__qualname__} must give its {cls.discriminator!r} field a string default "
                "equal to its entry-point name"
            )
        return field.default

    def check_model(self, model: ModelConfig) -> None:
        """Check this component against the decoder config, without torch.

        ``JobConfig`` calls it for the ``encoder``, ``adapter`` and ``arch`` sections once
        each section (and ``model``) validated on its own, so a combination that the
        builder would reject (e.g. more layers between cross-attention blocks than the
        decoder has) fails ``vlm validate`` instead of ``vlm train``.  Override it to
        check every constraint your builder enforces against the model; the default
        accepts any model.

        Raises:
            ConfigFieldError: a field of this config does not fit ``model``; the
                message should name the field, its value and the allowed range, e.g.
                ``"7 exceeds model.n_layers (4); allowed: 1..4"``.  ``JobConfig``
                reports it as a pydantic ``ValidationError`` at ``<section>.<field>``.
            ValueError: the section as a whole does not fit ``model`` (reported at
                ``<section>``).
        """
        return None


class EncoderConfig(ComponentConfig):
    """Base config of a vision encoder (entry-point group ``vlm.encoders``).

    Builder contract: ``(config) -> VisionEncoder`` producing ``(B, N, Dv)`` features.
    """

    type: str

    def predicted_num_tokens(self) -> int | None:
        """Patch tokens ``N`` per image, computed without torch; ``None`` if unknown until build."""
        return None

    def predicted_feature_dim(self) -> int | None:
        """Feature width ``Dv``, computed without torch; ``None`` if unknown until build."""
        return None


class AdapterConfig(ComponentConfig):
    """Base config of a vision->language adapter (entry-point group ``vlm.adapters``).

    Builder contract: ``(config, in_dim, out_dim) -> VisionAdapter``.
    """

    type: str

    def predicted_num_tokens(self, num_input_tokens: int) -> int:
        """Output tokens ``M`` for ``N`` input tokens (exact, torch-free).

        Raises:
            ValueError: when this adapter cannot take ``N`` tokens (e.g. a
                non-square grid for a pooling adapter).
        """
        return num_input_tokens


class FreezeSpec(StrictModel):
    """Freeze or unfreeze one module alias or fnmatch pattern over parameter names."""

    module: str = Field(
        min_length=1, description="alias (e.g. 'vision_encoder') or fnmatch pattern"
    )
    frozen: bool = True


class FreezeStage(StrictModel):
    """From ``step`` on, apply ``freeze`` (replacing the previous stage's specs)."""

    step: int = Field(ge=0)
    freeze: list[FreezeSpec] = Field(default_factory=list)


BASE_MODULE_ALIASES: dict[str, tuple[str, ...]] = {
    "vision_encoder": ("vision_encoder.*",),
    "adapter": ("adapter.*",),
    "transformer": ("transformer.*",),
    "frame_positions": ("frame_positions.*",),
}


class ArchConfig(ComponentConfig):
    """Base config of a fusion architecture (entry-point group ``vlm.archs``).

    Fields:
        max_text_len: text tokens per sample (prompt + target, padded).
        frames_per_clip: frames per video clip; 1 for still images.
        frame_positions: a learned per-frame embedding added to every visual token of
            a clip so frame order is recoverable (cross-attention K/V carry no rotary
            positions).  ``"auto"``: on when ``frames_per_clip > 1``.
        freeze: the trainable set at step 0.
        freeze_schedule: later stages, strictly increasing ``step``.

    Class variables:
        module_aliases: alias -> fnmatch patterns over VLM parameter names,
            merged with ``vision_encoder``, ``adapter`` and ``transformer``.
    """

    discriminator: ClassVar[str] = "arch"
    module_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}

    arch: str
    max_text_len: int = Field(default=64, ge=1)
    frames_per_clip: int = Field(default=1, ge=1)
    frame_positions: Literal["auto", "learned", "none"] = "auto"
    freeze: list[FreezeSpec] = Field(default_factory=list)
    freeze_schedule: list[FreezeStage] = Field(default_factory=list)

    @property
    def use_frame_positions(self) -> bool:
        """Whether the VLM adds a learned frame-position embedding to visual tokens."""
        if self.frame_positions == "auto":
            return self.frames_per_clip > 1
        return self.frame_positions == "learned"

    def residual_image_positions(self, num_visual_tokens: int) -> int:
        """Image positions this arch puts into the decoder's residual stream.

        ``num_visual_tokens`` is the adapter output count times ``frames_per_clip``.
        Prefix archs return it unchanged; cross-attention archs return 0.
        """
        return num_visual_tokens

    def image_placeholder_tokens(self, num_visual_tokens: int) -> int:
        """Placeholder ids one ``<image>`` expands to in a sample with images anywhere.

        ``residual_image_positions(num_visual_tokens)`` when the arch puts image
        positions into the residual stream, else 1 (an arch reading images from the
        side still needs one marker whose position orders the image in the text).
        Torch-free, so the data side computes it from the config alone; the model side
        (``strategy.image_placeholders``) follows the same rule.
        """
        positions = self.residual_image_positions(num_visual_tokens)
        return positions if positions > 0 else 1

    @classmethod
    def all_module_aliases(cls) -> dict[str, tuple[str, ...]]:
        """The base aliases plus this arch's own."""
        return {**BASE_MODULE_ALIASES, **cls.module_aliases}

    def resolve_freeze_patterns(self, module: str) -> tuple[str, ...]:
        """fnmatch patterns for an alias, or the string itself as a raw pattern."""
        return self.all_module_aliases().get(module, (module,))

    @field_validator("freeze_schedule")
    @classmethod
    def _schedule_increasing(cls, stages: list[FreezeStage]) -> list[FreezeStage]:
        steps = [s.step for s in stages]
        for prev, cur in itertools.pairwise(steps):
            if cur <= prev:
                raise ValueError(f"freeze_schedule steps must be strictly increasing, got {steps}")
        return stages

    @model_validator(mode="after")
    def _freeze_modules_known(self) -> ArchConfig:
        aliases = self.all_module_aliases()
        specs = list(self.freeze) + [s for st in self.freeze_schedule for s in st.freeze]
        for spec in specs:
            is_pattern = any(ch in spec.module for ch in "*?[")
            if spec.module not in aliases and not is_pattern and "." not in spec.module:
                raise ValueError(
                    f"freeze module {spec.module!r} is neither an alias "
                    f"({', '.join(sorted(aliases))}) nor an fnmatch pattern / dotted parameter name"
                )
        return self


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a parameter name matches one of the fnmatch patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
