"""``build_vlm``: compose encoder, adapter, decoder + trunk and strategy through the
plugin registry only (each config names its implementation; nothing here knows an arch)."""

from __future__ import annotations

import torch

from vlm_config import (
    AdapterConfig,
    ArchConfig,
    ComponentConfig,
    EncoderConfig,
    JobConfig,
    ModelConfig,
    PluginRegistry,
    check_sequence_budget,
    compute_sequence_budget,
    get_registry,
    load_implementation,
)
from vlm_strategies.api import ArchImplementation
from vlm_strategies.freezing import apply_freeze
from vlm_strategies.wrapper import VLMWrapper
from vlm_transformer import Transformer

__all__ = ["build_arch", "build_vlm", "build_vlm_from_configs"]


def _checked(registry: PluginRegistry, group: str, config: ComponentConfig) -> None:
    name = getattr(config, type(config).discriminator)
    cls = registry.load(group, name)
    if not isinstance(config, cls):
        raise TypeError(
            f"{group} config for {name!r} is a {type(config).__qualname__}, but the registry "
            f"provides {cls.__qualname__}"
        )


def build_arch(
    arch: ArchConfig, model: ModelConfig, registry: PluginRegistry | None = None
) -> ArchImplementation:
    """The arch's implementation object (registry-checked)."""
    _checked(registry or get_registry(), "vlm.archs", arch)
    impl = load_implementation(arch)(arch, model)
    if not isinstance(impl, ArchImplementation):
        raise TypeError(
            f"{type(arch).implementation} returned {type(impl).__name__}, not an ArchImplementation"
        )
    return impl


def build_vlm_from_configs(
    encoder: EncoderConfig,
    adapter: AdapterConfig,
    arch: ArchConfig,
    model: ModelConfig,
    *,
    init_device: str | torch.device | None = None,
    registry: PluginRegistry | None = None,
) -> VLMWrapper:
    """Build a :class:`VLMWrapper` from the four configs.

    Args:
        init_device: where the adapter, decoder and frame positions are constructed.
            ``"meta"`` leaves them uninitialised (call ``to_empty`` then
            ``init_weights()``); otherwise they are initialised here.  The encoder is
            always built on the CPU with its own (loaded) weights.
        registry: defaults to the process-wide registry.

    Raises:
        vlm_config.PluginError: a plugin name is not usable.
        ValueError: the sequence budget with the encoder's resolved token count exceeds
            ``model.max_seq_len``, or the adapter rejects that count.
    """
    registry = registry or get_registry()
    _checked(registry, "vlm.encoders", encoder)
    _checked(registry, "vlm.adapters", adapter)
    impl = build_arch(arch, model, registry)
    vision = load_implementation(encoder)(encoder)
    check_sequence_budget(
        compute_sequence_budget(encoder, adapter, arch, model, encoder_tokens=vision.num_tokens)
    )
    with torch.device(init_device or "cpu"):
        adapter_module = load_implementation(adapter)(adapter, vision.feature_dim, model.dim)
        transformer = Transformer(model, impl.build_trunk())
        wrapper = VLMWrapper(
            vision,
            adapter_module,
            transformer,
            impl,
            frames_per_clip=arch.frames_per_clip,
            frame_positions=arch.use_frame_positions,
        )
    if torch.device(init_device or "cpu").type != "meta":
        wrapper.init_weights()
    apply_freeze(wrapper, arch, step=0)
    return wrapper


def build_vlm(
    job: JobConfig,
    *,
    init_device: str | torch.device | None = None,
    registry: PluginRegistry | None = None,
) -> VLMWrapper:
    """:func:`build_vlm_from_configs` from a validated :class:`~vlm_config.JobConfig`."""
    return build_vlm_from_configs(
        job.encoder, job.adapter, job.arch, job.model, init_device=init_device, registry=registry
    )
