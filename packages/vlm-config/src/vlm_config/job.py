"""The top-level job config tying the decoder, the four plugin sections, parallelism
and training together, with the config-time sequence budget.

``encoder``, ``adapter``, ``arch`` and ``data`` validate into the installed plugin class chosen
by their discriminator (``type`` / ``arch``), so plugin-specific fields are validated
and appear in the JSON schema.  Validate with :meth:`JobConfig.model_validate` (or
:func:`vlm_config.load_job_config`): it resolves the plugin classes from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import (
    BeforeValidator,
    Field,
    SerializeAsAny,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import InitErrorDetails

from vlm_config.components import (
    AdapterConfig,
    ArchConfig,
    ComponentConfig,
    ConfigFieldError,
    EncoderConfig,
    StrictModel,
)
from vlm_config.data import DatasetConfig, NoDatasetConfig, migrate_legacy_data
from vlm_config.model import ModelConfig
from vlm_config.parallel import ParallelConfig
from vlm_config.registry import GROUP_BASES, PluginError, PluginRegistry, get_registry
from vlm_config.train import TrainConfig

#: the dataset a job without ``[data]`` gets when no ``digits`` plugin is installed
NO_DATASET = NoDatasetConfig.model_fields["type"].default

#: section -> (registry group, default plugin name used when the tag is omitted, then
#: fallbacks): the first of the names that is installed fills in an omitted tag, the
#: first name when none is (so the error names the preferred one)
PLUGIN_SECTIONS: dict[str, tuple[str, ...]] = {
    "encoder": ("vlm.encoders", "random"),
    "adapter": ("vlm.adapters", "mlp_2layer"),
    "arch": ("vlm.archs", "joint_decoder"),
    # model-only installs (no vlm-data) still validate jobs: vlm-config's ``none``
    "data": ("vlm.datasets", "digits", NO_DATASET),
}


def default_plugin_name(section: str, registry: PluginRegistry | None = None) -> str:
    """The plugin name an omitted ``section`` tag gets (see :data:`PLUGIN_SECTIONS`)."""
    group, *names = PLUGIN_SECTIONS[section]
    installed = (registry or get_registry()).names(group)
    return next((name for name in names if name in installed), names[0])


@dataclass(frozen=True)
class SequenceBudget:
    """Positions a sample occupies in the decoder, predicted without torch.

    ``encoder_tokens`` is ``None`` when the encoder can only tell at build time.
    """

    encoder_tokens: int | None
    adapter_tokens: int | None
    frames: int
    image_positions: int | None
    max_text_len: int
    max_seq_len: int

    @property
    def total(self) -> int | None:
        if self.image_positions is None:
            return None
        return self.image_positions + self.max_text_len

    def describe(self) -> str:
        if self.total is None:
            return (
                f"visual tokens: resolved at build time; text {self.max_text_len}; "
                f"max_seq_len {self.max_seq_len}"
            )
        return (
            f"visual tokens: {self.encoder_tokens} per frame from the encoder -> "
            f"{self.adapter_tokens} after the adapter x {self.frames} frame(s); "
            f"image positions in the residual stream: {self.image_positions}; "
            f"text: {self.max_text_len}; total {self.total} of max_seq_len {self.max_seq_len}"
        )


def compute_sequence_budget(
    encoder: EncoderConfig,
    adapter: AdapterConfig,
    arch: ArchConfig,
    model: ModelConfig,
    encoder_tokens: int | None = None,
) -> SequenceBudget:
    """Predict the sequence budget; ``encoder_tokens`` overrides the encoder's prediction.

    Raises:
        ValueError: when the adapter rejects the encoder's token count.
    """
    n = encoder_tokens if encoder_tokens is not None else encoder.predicted_num_tokens()
    m = adapter.predicted_num_tokens(n) if n is not None else None
    frames = arch.frames_per_clip
    positions = arch.residual_image_positions(m * frames) if m is not None else None
    return SequenceBudget(n, m, frames, positions, arch.max_text_len, model.max_seq_len)


def check_sequence_budget(budget: SequenceBudget) -> None:
    """Raise ``ValueError`` naming the fields when the budget exceeds ``model.max_seq_len``."""
    if budget.total is not None and budget.total > budget.max_seq_len:
        raise ValueError(
            f"sequence budget exceeded: {budget.image_positions} image positions + "
            f"arch.max_text_len {budget.max_text_len} = {budget.total} > model.max_seq_len "
            f"{budget.max_seq_len}; raise model.max_seq_len, lower arch.max_text_len, or use "
            "an adapter that emits fewer tokens"
        )


def component_model_errors(
    sections: dict[str, ComponentConfig], model: ModelConfig
) -> list[InitErrorDetails]:
    """Run every section's :meth:`~vlm_config.ComponentConfig.check_model` hook against
    ``model`` and collect the failures as pydantic error details located at
    ``<section>.<field>`` (a :class:`~vlm_config.ConfigFieldError`) or ``<section>``
    (any other ``ValueError``)."""
    details: list[InitErrorDetails] = []
    for section, component in sections.items():
        try:
            component.check_model(model)
        except ConfigFieldError as exc:
            details.append(
                InitErrorDetails(
                    type="value_error",
                    loc=(section, exc.field),
                    input=getattr(component, exc.field, None),
                    ctx={"error": exc},
                )
            )
        except ValueError as exc:
            details.append(
                InitErrorDetails(
                    type="value_error",
                    loc=(section,),
                    input=component.model_dump(),
                    ctx={"error": exc},
                )
            )
    return details


def _fill_default_tags(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for section, (group, *_names) in PLUGIN_SECTIONS.items():
        key = GROUP_BASES[group].discriminator
        default = default_plugin_name(section)
        value = data.get(section)
        if value is None and section not in data:
            data[section] = {key: default}
        elif isinstance(value, dict) and key not in value:
            data[section] = {key: default, **value}
    return data


class JobConfig(StrictModel):
    """One training / inference job.

    Raises (as pydantic ``ValidationError``): unknown keys, unknown plugin names
    (the message lists the installed ones), field constraint violations, a plugin
    section that its :meth:`~vlm_config.ComponentConfig.check_model` hook finds
    incompatible with ``model`` (located at the offending field, e.g.
    ``arch.cross_attention_every_n_layers``) and a sequence budget that exceeds
    ``model.max_seq_len``.
    """

    name: str = "vlm"
    model: ModelConfig = Field(default_factory=ModelConfig)
    encoder: SerializeAsAny[EncoderConfig]
    adapter: SerializeAsAny[AdapterConfig]
    arch: SerializeAsAny[ArchConfig]
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: SerializeAsAny[DatasetConfig]

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("data"), dict):
            data = {**data, "data": migrate_legacy_data(data["data"], _dataset_fields)}
        return _fill_default_tags(data)

    @model_validator(mode="after")
    def _components_fit_model(self) -> JobConfig:
        sections = {section: getattr(self, section) for section in PLUGIN_SECTIONS}
        details = component_model_errors(sections, self.model)
        if details:
            raise ValidationError.from_exception_data(type(self).__name__, details)
        return self

    @model_validator(mode="after")
    def _budget(self) -> JobConfig:
        check_sequence_budget(self.sequence_budget())
        return self

    def sequence_budget(self, encoder_tokens: int | None = None) -> SequenceBudget:
        """The predicted budget (see :func:`compute_sequence_budget`)."""
        return compute_sequence_budget(
            self.encoder, self.adapter, self.arch, self.model, encoder_tokens
        )

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> JobConfig:  # type: ignore[override]
        if cls is JobConfig:
            return resolved_job_config_class().model_validate(obj, *args, **kwargs)
        return super().model_validate(obj, *args, **kwargs)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        if cls is JobConfig:
            return resolved_job_config_class().model_json_schema(*args, **kwargs)
        return super().model_json_schema(*args, **kwargs)


def _dataset_fields(name: str) -> set[str] | None:
    """Field names of the installed dataset config ``name`` (``None`` if unusable)."""
    try:
        return set(get_registry().load("vlm.datasets", name).model_fields)
    except PluginError:
        return None


def _check_tag(registry: PluginRegistry, group: str, usable: dict[str, Any]) -> Any:
    """Before the union: explain an unusable tag (unknown, broken, duplicated)."""
    key = GROUP_BASES[group].discriminator

    def check(value: Any) -> Any:
        tag = value.get(key) if isinstance(value, dict) else None
        if isinstance(tag, str) and tag not in usable:
            try:
                registry.load(group, tag)
            except PluginError as exc:
                raise ValueError(str(exc)) from None
        return value

    return check


def _no_plugins(registry: PluginRegistry, group: str) -> Any:
    check = _check_tag(registry, group, {})

    def fail(value: Any) -> Any:
        check(value)
        raise ValueError(f"no usable {group} plugins are installed; see `vlm plugins`")

    return fail


_cache: dict[int, tuple[int, type[JobConfig]]] = {}


def resolved_job_config_class(registry: PluginRegistry | None = None) -> type[JobConfig]:
    """A ``JobConfig`` subclass whose plugin sections are discriminated unions of the
    classes installed now (rebuilt when the registry refreshes or registers)."""
    registry = registry or get_registry()
    cached = _cache.get(id(registry))
    if cached is not None and cached[0] == registry.generation:
        return cached[1]
    fields: dict[str, Any] = {}
    for section, (group, *_names) in PLUGIN_SECTIONS.items():
        usable = registry.load_all(group)
        classes = list(usable.values())
        base = GROUP_BASES[group]
        if classes:
            union: Any = Union[tuple(classes)]  # type: ignore[valid-type]  # noqa: UP007
            annotated: Any = Annotated[
                union,
                Field(discriminator=base.discriminator),
                BeforeValidator(_check_tag(registry, group, usable)),
            ]
        else:
            annotated = Annotated[base, BeforeValidator(_no_plugins(registry, group))]
        fields[section] = (annotated, ...)
    resolved = create_model(  # type: ignore[call-overload]
        "JobConfig", __base__=JobConfig, __module__=__name__, **fields
    )
    _cache[id(registry)] = (registry.generation, resolved)
    return resolved  # type: ignore[no-any-return]
