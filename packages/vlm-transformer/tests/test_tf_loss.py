import pytest
import torch
import torch.nn.functional as F

from vlm_transformer import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_linear_cross_entropy_matches_unfused(chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=gen, requires_grad=True)
    w = torch.randn(40, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, 40, (50,), generator=gen)
    t[::3] = -100
    ref = F.cross_entropy(F.linear(h, w), t)
    ref_grads = torch.autograd.grad(2 * ref, (h, w))
    out = linear_cross_entropy(h, w, t, chunk_size=chunk)
    grads = torch.autograd.grad(2 * out, (h, w))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_linear_cross_entropy_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(torch.zeros(4, 8), torch.zeros(5, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(torch.zeros(4, 8), torch.zeros(5, 7), torch.zeros(4, dtype=torch.long))
