"""``VLMWrapper.loss`` (fused LM head + cross-entropy) == the loss of the logits, for
every built-in arch."""

from typing import Any

import pytest
import torch
from strategies_helpers import BUILTIN_ARCHS, tiny_job

from vlm_strategies import build_vlm, causal_lm_loss


@pytest.mark.parametrize("arch", BUILTIN_ARCHS, ids=lambda a: a["arch"])
def test_fused_loss_matches_logits_loss(arch: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build_vlm(tiny_job(arch)).train()
    with torch.no_grad():  # open zero-initialised paths (cross-attention outputs)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 16, 16, generator=gen)
    ids = torch.randint(0, 64, (2, 10), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    ref = causal_lm_loss(model(pixels, ids)[0], labels)
    # (prefix archs: the last layer's image output side is unused, so its gradients are
    # zeros; moma: auxiliary losses are excluded from both)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True, materialize_grads=True)
    out = model.loss(pixels, ids, labels, chunk_size=3)
    grads = torch.autograd.grad(out, params, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_fused_loss_rejects_misshaped_labels() -> None:
    model = build_vlm(tiny_job({"arch": "joint_decoder"}))
    ids = torch.zeros(2, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        model.loss(torch.zeros(2, 3, 16, 16), ids, ids[:, :5])
