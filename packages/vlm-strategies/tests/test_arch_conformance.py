"""The conformance kit (:mod:`vlm_strategies.testing`) on the built-in archs, and on
deliberately broken archs to show that each check can fail."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import distribution
from typing import Any, ClassVar, Literal

import pytest
import torch
from strategies_helpers import BUILTIN_ARCHS as BUILTIN
from torch import Tensor

from vlm_config import ArchConfig, get_registry
from vlm_strategies import PrefixArchImplementation
from vlm_strategies.media import MediaEmbeds, scatter_fields
from vlm_strategies.testing import (
    NotApplicable,
    TinyVLM,
    check_causality,
    check_compile,
    check_generation,
    check_interleaved,
    check_meta_init,
    check_packing,
    check_padded_frames,
    check_text_only,
    conformance_cases,
    run_case,
    run_conformance,
)
from vlm_transformer import DenseTrunk, KVCache, ModalityContext, TrunkInputs


def test_builtin_list_is_every_arch_this_distribution_ships() -> None:
    shipped = {
        e.name for e in distribution("vlm-strategies").entry_points if e.group == "vlm.archs"
    }
    assert {a["arch"] for a in BUILTIN} == shipped


@pytest.mark.parametrize("case", conformance_cases())
@pytest.mark.parametrize("arch", BUILTIN, ids=lambda a: a["arch"])
def test_builtin_arch_conforms(arch: dict[str, Any], case: str) -> None:
    run_case(case, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [BUILTIN[0], BUILTIN[3]], ids=lambda a: a["arch"])
def test_forward_and_backward_trace_with_aot_autograd(arch: dict[str, Any]) -> None:
    check_compile(arch, backend="aot_eager")


def test_kit_api_errors_and_report() -> None:
    with pytest.raises(ValueError, match="unknown conformance case 'speed'; known: causality"):
        run_case("speed", BUILTIN[0])
    with pytest.raises(ValueError, match="must name the arch"):
        TinyVLM({"frames_per_clip": 2}).job()
    report = run_conformance(BUILTIN[3], ["causality", "padded_frames"])
    assert report["padded_frames"] == "passed"
    assert report["causality"].startswith("not applicable: moma: MoMa sets incremental_decoding")
    with pytest.raises(NotApplicable):  # outside pytest's skipping, through the kit's API
        from vlm_strategies import testing

        token = testing._PYTEST_SKIPS.set(False)
        try:
            check_causality(BUILTIN[3])
        finally:
            testing._PYTEST_SKIPS.reset(token)


# ------------------------------------------------------------------ broken archs


class BrokenConfig(ArchConfig):
    arch: Literal["test_broken"] = "test_broken"
    implementation: ClassVar[str] = f"{__name__}:Peeking"


class _Prefix(PrefixArchImplementation):
    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        text = torch.ones(input_ids.shape, dtype=torch.bool)
        valid = None if image_valid is None else torch.cat((image_valid, text), dim=1)
        return ModalityContext(prefix_embeds=image_embeds, key_padding_mask=valid)


class _PeekingTrunk(DenseTrunk):
    """Adds the sequence mean: every position sees the future."""

    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        return super().forward(hidden + hidden.mean(dim=1, keepdim=True), state)


class Peeking(_Prefix):
    def build_trunk(self) -> DenseTrunk:
        return _PeekingTrunk(self.model_config)


class Unmasked(_Prefix):
    """Forgets ``image_valid``: padded frames' tokens are attended."""

    def context(
        self, image_embeds: Tensor, image_valid: Tensor | None, input_ids: Tensor
    ) -> ModalityContext:
        return ModalityContext(prefix_embeds=image_embeds)


class RepeatsPrefix(_Prefix):
    """A wrong cached step: feeds the image prefix again."""

    def decode_context(
        self, image_embeds: Tensor, image_valid: Tensor | None, new_ids: Tensor, cache: KVCache
    ) -> ModalityContext:
        return ModalityContext(prefix_embeds=image_embeds[:, :1])


class _UninitialisedTrunk(DenseTrunk):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.extra = torch.nn.Parameter(torch.randn(config.dim))  # no init hook

    def init_weights(self) -> None:
        extra = self.extra
        del self.extra  # init_module_tree must not see it: it stays as materialised
        super().init_weights()
        self.extra = extra

    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        return super().forward(hidden + self.extra, state)


class Uninitialised(_Prefix):
    def build_trunk(self) -> DenseTrunk:
        return _UninitialisedTrunk(self.model_config)


class _GraphBreakTrunk(DenseTrunk):
    def forward(self, hidden: Tensor, state: TrunkInputs) -> Tensor:
        torch._dynamo.graph_break()
        return super().forward(hidden, state)


class GraphBreak(_Prefix):
    def build_trunk(self) -> DenseTrunk:
        return _GraphBreakTrunk(self.model_config)


class MediaSound(_Prefix):
    """Images anywhere done right (scatter into placeholders)."""

    def media_context(self, media: MediaEmbeds) -> ModalityContext:
        return ModalityContext(**scatter_fields(media))


class NoPacking(MediaSound):
    """Forgets ``sequence_ids``: packed samples attend each other."""

    def media_context(self, media: MediaEmbeds) -> ModalityContext:
        return ModalityContext(**{**scatter_fields(media), "sequence_ids": None})


class NoAnchor(MediaSound):
    """Drops the dummy encoder pass of a text-only batch: no gradient reaches the
    adapter (an FSDP2 rank with a text-only micro-batch would hang)."""

    def media_context(self, media: MediaEmbeds) -> ModalityContext:
        return ModalityContext(**{**scatter_fields(media), "grad_anchor": None})


class ReFeedsImages(MediaSound):
    """A wrong cached step after an interleaved prompt: feeds a zero prefix again."""

    def media_decode_context(
        self, media: MediaEmbeds, new_ids: Tensor, cache: KVCache
    ) -> ModalityContext:
        d = media.tokens.shape[-1]
        return ModalityContext(prefix_embeds=media.tokens.new_ones(new_ids.shape[0], 1, d))


@pytest.fixture
def broken() -> Iterator[None]:
    get_registry().register("archs", BrokenConfig, replace=True)
    try:
        yield
    finally:
        BrokenConfig.implementation = f"{__name__}:Peeking"
        get_registry().unregister("archs", "test_broken")


@pytest.mark.usefixtures("broken")
@pytest.mark.parametrize(
    ("impl", "check", "message"),
    [
        ("Peeking", check_causality, "changing text token 4 changed earlier logits"),
        ("Unmasked", check_padded_frames, "padded frames .image_valid False. changed logits"),
        ("RepeatsPrefix", check_generation, "generate gave"),
        ("Uninitialised", check_meta_init, r"init_weights left uninitialised: \['transformer"),
        ("NoPacking", check_packing, "packed sample 1 vs alone"),
        ("NoAnchor", check_text_only, "adapter.* gets no gradient"),
        ("ReFeedsImages", check_interleaved, "use_cache=None: generate gave"),
    ],
)
def test_each_check_fails_on_an_arch_that_breaks_it(impl: str, check: Any, message: str) -> None:
    media = check in (check_packing, check_text_only, check_interleaved)
    BrokenConfig.implementation = f"{__name__}:{'MediaSound' if media else '_Prefix'}"
    check({"arch": "test_broken"})  # the sound base arch passes
    BrokenConfig.implementation = f"{__name__}:{impl}"
    with pytest.raises(AssertionError, match=f"test_broken.*{message}"):
        check({"arch": "test_broken"})


@pytest.mark.usefixtures("broken")
def test_compile_check_fails_on_a_graph_break() -> None:
    BrokenConfig.implementation = f"{__name__}:GraphBreak"
    with pytest.raises(Exception, match="graph_break|graph break"):
        check_compile({"arch": "test_broken"})
    check_compile({"arch": "test_broken"}, fullgraph=False)


@pytest.mark.usefixtures("broken")
def test_media_checks_reject_then_skip_a_prefix_only_arch() -> None:
    BrokenConfig.implementation = f"{__name__}:_Prefix"
    report = run_conformance({"arch": "test_broken"}, ["interleaved", "packing", "text_only"])
    for case in ("interleaved", "packing", "text_only"):
        assert report[case] == (
            "not applicable: test_broken: supports only the image-prefix layout (no media_context)"
        )
