"""Adversarial vectors: the forward value is exactly the codeword and every gradient is finite, in every precision."""
from __future__ import annotations

import pytest
import torch

from adapters.quantizer import GRADIENTS, NormRotationQuantizer, RotationVectorQuantizer, rotation_trick


def adversarial_rows(d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (e, q) that break a naive rotation: zero, tiny, antipodal, huge, identical, zero codeword."""
    base = torch.tensor([1.0, -2.0, 0.5, 3.0][:d])
    e = torch.stack([
        torch.zeros(d),          # |e| = 0
        base * 1e-20,            # |e|^2 underflows in fp32
        base,                    # antipodal to its codeword
        base / base.norm() * 3e4,  # |e| = 3e4: |e|^2 overflows in fp16
        base,                    # identical to its codeword
        base,                    # zero codeword
        base + 1e-7,             # almost antipodal
    ])
    q = torch.stack([base, base, -base, base * 0.1, base, torch.zeros(d), -base])
    return e, q


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_functional_adversarial_fp32_and_fp64(gradient: str) -> None:
    for dtype in (torch.float32, torch.float64):
        e, q = (t.to(dtype) for t in adversarial_rows())
        e.requires_grad_(True)
        out = rotation_trick(e, q, gradient)
        out.backward(torch.ones_like(out))
        assert torch.isfinite(e.grad).all(), (gradient, dtype, e.grad)
        if gradient != "ste":
            assert torch.equal(out.detach(), q)
        # Degenerate rows (zero, tiny, zero codeword; antipodal for a rotation) fall back to straight-through.
        # A reflection is defined for antipodal rows (it flips u onto q^), so it keeps its own gradient there.
        rows = [0, 1, 5] if gradient == "reflection" else [0, 1, 2, 5]
        torch.testing.assert_close(e.grad[rows], torch.ones(len(rows), 4, dtype=dtype))


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_functional_under_autocast_keeps_input_dtype(gradient: str, amp_dtype: torch.dtype) -> None:
    e, q = adversarial_rows()
    e = e.to(amp_dtype).requires_grad_(True)
    q = q.to(amp_dtype)
    with torch.autocast("cpu", dtype=amp_dtype):
        out = rotation_trick(e, q, gradient)
    assert out.dtype == amp_dtype
    out.float().sum().backward()
    assert torch.isfinite(e.grad.float()).all()
    if gradient != "ste":
        assert torch.equal(out.detach(), q)


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("n", [1, 5])
def test_module_adversarial_inputs(gradient: str, n: int) -> None:
    torch.manual_seed(0)
    m = RotationVectorQuantizer(16, 4, gradient=gradient)
    with torch.no_grad():
        m.embedding.weight[0].zero_()  # a zero codeword in the codebook
    e, _ = adversarial_rows()
    rows = torch.cat([e, torch.randn(n, 4), -m.embedding.weight[3:4].detach() * 1e3])
    z = rows.view(1, -1, 1, 4).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    for amp in (None, torch.bfloat16, torch.float16):
        z.grad = None
        m.zero_grad()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            z_q, loss, (_, _, idx) = m(z)
        (z_q.float().sum() + loss).backward()
        assert torch.isfinite(z.grad).all() and torch.isfinite(m.embedding.weight.grad).all()
        assert torch.isfinite(loss)
        if gradient != "ste":
            expect = m.embedding.weight[idx].view(1, -1, 1, 4).permute(0, 3, 1, 2).to(z_q.dtype)
            assert torch.equal(z_q.detach(), expect)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_infinite_input_still_gives_the_codeword(gradient: str) -> None:
    e = torch.tensor([[float("inf"), 1.0, 0.0], [1.0, 2.0, 3.0]], requires_grad=True)
    q = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    out = rotation_trick(e, q, gradient)
    out.sum().backward()
    if gradient != "ste":
        assert torch.equal(out.detach(), q)
        assert torch.isfinite(e.grad).all()


def test_norm_module_zero_and_huge_inputs() -> None:
    m = NormRotationQuantizer(4, 16, gradient="rotation_released")
    e, _ = adversarial_rows()
    z = e.unsqueeze(0).requires_grad_(True)
    z_q, loss, idx = m(z)
    (z_q.sum() + loss).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(loss)
    assert torch.equal(z_q.detach(), torch.nn.functional.normalize(m.embedding.weight[idx], dim=-1))
