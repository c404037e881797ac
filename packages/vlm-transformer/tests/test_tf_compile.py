from __future__ import annotations

import time

import pytest
import torch
from tf_helpers import tiny_model


@pytest.mark.slow
def test_compile_fullgraph_forward_backward() -> None:
    torch._dynamo.reset()
    model = tiny_model(n_layers=1).train()
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 64, (2, 8))
    start = time.perf_counter()
    logits = compiled(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    print(f"\n[compile] first forward+backward took {time.perf_counter() - start:.1f}s")
    eager = model(ids)
    torch.testing.assert_close(logits, eager, atol=1e-5, rtol=1e-5)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
