"""Every gradient estimator against an independent float64 oracle built from explicit d x d matrices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.quantizer import GRADIENTS, check_gradient, rotation_trick


def oracle_grad(e: np.ndarray, q: np.ndarray, g: np.ndarray, gradient: str) -> np.ndarray:
    """grad_e for one row, from explicit matrices (the formulas in the paper and the authors' released code)."""
    d = e.shape[0]
    eye = np.eye(d)
    ne, nq = np.linalg.norm(e), np.linalg.norm(q)
    u, qh = e / ne, q / nq
    w = (u + qh) / np.linalg.norm(u + qh)
    rot = eye - 2 * np.outer(w, w) + 2 * np.outer(qh, u)
    # The oracle checks its own matrices first: R is a rotation taking u onto q^.
    assert np.allclose(rot @ rot.T, eye, atol=1e-10) and np.allclose(rot @ u, qh, atol=1e-10)
    proj = eye - np.outer(u, u)  # Jacobian of e -> e/|e| is proj / |e|
    if gradient == "ste":
        return g
    if gradient == "rotation":
        return (nq / ne) * rot.T @ g
    if gradient == "rotation_released":
        return nq * (proj / ne).T @ rot.T @ g
    if gradient == "reflection":
        v = (u - qh) / np.linalg.norm(u - qh)
        ref = eye - 2 * np.outer(v, v)
        assert np.allclose(ref @ u, qh, atol=1e-10)
        return nq * (proj / ne).T @ ref.T @ g
    if gradient == "rotation_unscaled":
        return (proj / ne).T @ rot.T @ g
    raise AssertionError(gradient)


def _ours(e: torch.Tensor, q: torch.Tensor, g: torch.Tensor, gradient: str) -> tuple[torch.Tensor, torch.Tensor]:
    e = e.clone().requires_grad_(True)
    out = rotation_trick(e, q, gradient)
    out.backward(g)
    return out.detach(), e.grad


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("d", [2, 3, 4, 32])
def test_gradient_matches_explicit_matrix_oracle(gradient: str, d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    n = 64
    e = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.rand(n, 1, generator=gen, dtype=torch.float64) * 3
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    g = torch.randn(n, d, generator=gen, dtype=torch.float64)
    out, grad = _ours(e, q, g, gradient)
    expect = np.stack([oracle_grad(e[i].numpy(), q[i].numpy(), g[i].numpy(), gradient) for i in range(n)])
    np.testing.assert_allclose(grad.numpy(), expect, rtol=1e-9, atol=1e-11)
    if gradient == "ste":
        torch.testing.assert_close(out, e + (q - e), rtol=0, atol=0)
    else:
        assert torch.equal(out, q), "the forward value must be exactly the codeword"


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_float32_agrees_with_float64(gradient: str) -> None:
    gen = torch.Generator().manual_seed(7)
    e, q, g = (torch.randn(256, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    _, g64 = _ours(e, q, g, gradient)
    out32, g32 = _ours(e.float(), q.float(), g.float(), gradient)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-5)


def test_rotation_preserves_inner_product_and_released_is_orthogonal_to_e() -> None:
    gen = torch.Generator().manual_seed(3)
    e, q, g = (torch.randn(128, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    _, grad_rot = _ours(e, q, g, "rotation")
    _, grad_rel = _ours(e, q, g, "rotation_released")
    torch.testing.assert_close((e * grad_rot).sum(-1), (q * g).sum(-1), rtol=1e-10, atol=1e-10)
    assert (e * grad_rel).sum(-1).abs().max() < 1e-10
    # The released form is the paper's gradient with its component along e removed.
    u = e / e.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(grad_rel, grad_rot - (grad_rot * u).sum(-1, keepdim=True) * u, rtol=1e-10, atol=1e-10)
    # And it differs from straight-through: the gradient really is rotated and rescaled.
    assert (grad_rot - g).abs().max() > 1e-2


def test_rotation_matches_vector_quantize_pytorch_rotate_to() -> None:
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch",
                              reason="vector-quantize-pytorch (the test extra) is not installed")
    gen = torch.Generator().manual_seed(11)
    e, q, g = (torch.randn(512, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    out, grad = _ours(e, q, g, "rotation")
    e_peer = e.clone().requires_grad_(True)
    out_peer = vqp.rotate_to(e_peer, q)
    out_peer.backward(g)
    torch.testing.assert_close(out, out_peer.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, e_peer.grad, rtol=1e-9, atol=1e-9)


def test_unknown_gradient_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown gradient estimator 'rotaton'.*ste, rotation, rotation_released"):
        check_gradient("rotaton")
    e = torch.randn(4, 3)
    with pytest.raises(ValueError, match="choose one of"):
        rotation_trick(e, e, "straight")
