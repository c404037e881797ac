"""The arch plugin contract, checked by the core's conformance kit as any third-party arch
author would run it (``vlm_strategies.testing``)."""

from __future__ import annotations

import pytest

from vlm_strategies.testing import TinyVLM, conformance_cases, run_case

GATED = TinyVLM(
    {"arch": "gated_cross_attention", "every_n_layers": 1, "gate_init": 0.5},
    adapter={"type": "perceiver_resampler", "num_latents": 6},
)


@pytest.mark.parametrize("case", conformance_cases())
def test_gated_cross_attention_conforms(case: str) -> None:
    run_case(case, GATED)


@pytest.mark.parametrize("case", ["padded_frames", "generation"])
def test_gated_cross_attention_conforms_with_the_default_adapter(case: str) -> None:
    run_case(case, {"arch": "gated_cross_attention"})
