"""FSDP2 with images anywhere: a rank whose micro-batches hold no image still takes part
in every collective (the encoder and adapter run on a dummy image times 0, every arch
block still runs), and training matches one process on the same global batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import vlmp_media_workers as mw

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("arch", ["joint_decoder", "cross_attention", "mot", "moma"])
def test_text_only_rank_trains_like_one_process(tmp_path: Path, arch: str) -> None:
    job = mw.tiny_job_dict(arch)
    two = mw.launch(2, tmp_path, job=job)
    one = mw.w_text_only_rank(job=job)
    # rank 1 really had no image for the first steps, then one
    assert two[1]["images"] == [0] * mw.TEXT_ONLY_STEPS + [1] * (5 - mw.TEXT_ONLY_STEPS)
    assert two[0]["images"] == [2] * 5
    assert two[0]["losses"] == two[1]["losses"]
    for step, (a, b) in enumerate(zip(two[0]["losses"], one["losses"])):
        assert abs(a - b) <= 1e-5, f"{arch} step {step}: 2-proc {a} vs 1-proc {b}"
    worst = max((two[0]["final"][k] - one["final"][k]).abs().max().item() for k in one["final"])
    assert worst < 5e-4, f"{arch}: parameters after 5 steps differ by {worst}"
