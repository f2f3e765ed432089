"""The rotation trick as pure functions (Fifty et al., ICLR 2025, arXiv 2410.06424, Section 4.2).

Every estimator takes the encoder output ``e`` and its codeword ``q`` as ``(N, d)`` rows and returns ``(N, d)`` rows
whose forward value is exactly ``q`` (for ``ste`` it is upstream's ``e + (q - e).detach()``, bit for bit) and whose
gradient with respect to ``e`` is the estimator's:

=====================  ==========================================================================================
``ste``                grad_e = grad_q (taming's straight-through copy)
``rotation``           grad_e = (|q|/|e|) R^T grad_q: the paper's formula, ``q~ = sg[(|q|/|e|) R] e``;
                       <e, grad_e> = <q, grad_q>. vector-quantize-pytorch's ``rotate_to`` computes the same.
``rotation_released``  the authors' released Table 3/4 code (``rot_trick``): ``sg[|q| R] (e/|e|)``; the gradient also
                       passes through the normalisation, grad_e = (|q|/|e|) (I - u u^T) R^T grad_q, so <e, grad_e> = 0.
``reflection``         that code's ``ref_trick``: a Householder reflection H = I - 2 v v^T, v ∝ e/|e| - q/|q|,
                       in place of R: grad_e = (|q|/|e|) (I - u u^T) H grad_q.
``rotation_unscaled``  that code's ``no_grad_scale``: ``sg[R] (e/|e|)`` with no |q| factor:
                       grad_e = (1/|e|) (I - u u^T) R^T grad_q.
=====================  ==========================================================================================

with u = e/|e|, q^ = q/|q|, w = (u + q^)/|u + q^| and R = I - 2 w w^T + 2 q^ u^T (R u = q^). R is never formed:
applying it costs O(N d). Norms are taken in float32 (float64 for float64 input) whatever the autocast dtype. Where a rotation is undefined
(|e| or |q| near zero, e antipodal to q) the row falls back to straight-through, so nothing is ever NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

GRADIENTS: tuple[str, ...] = ("ste", "rotation", "rotation_released", "reflection", "rotation_unscaled")

# Below this norm a vector has no usable direction (fp32 keeps ~7 digits; 1e-20 squared underflows).
NORM_EPS = 1e-12
# Below this |u + q^| the rotation axis w is numerically meaningless (e antipodal to q).
AXIS_EPS = 1e-4


def check_gradient(gradient: str) -> str:
    """Return ``gradient`` if it names an estimator, else raise one ValueError listing the valid names."""
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient estimator {gradient!r}: choose one of {', '.join(GRADIENTS)}")
    return gradient


def straight_through(e: Tensor, q: Tensor) -> Tensor:
    """taming's straight-through estimator, bit for bit: value q (up to upstream's rounding), grad_e = grad_q."""
    return e + (q - e).detach()


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """(N, d), (N, d) -> (N, 1) row-wise inner products."""
    return (a * b).sum(dim=-1, keepdim=True)


def rotate(x: Tensor, u: Tensor, q_hat: Tensor, w: Tensor) -> Tensor:
    """Apply R = I - 2 w w^T + 2 q^ u^T to the rows of x, O(N d). Shapes: all (N, d)."""
    return x - 2.0 * _rowdot(x, w) * w + 2.0 * _rowdot(x, u) * q_hat


def reflect(x: Tensor, v: Tensor) -> Tensor:
    """Apply the Householder reflection H = I - 2 v v^T (v unit, or zero for H = I) to the rows of x. (N, d)."""
    return x - 2.0 * _rowdot(x, v) * v


def rotation_trick(e: Tensor, q: Tensor, gradient: str = "rotation", eps: float = NORM_EPS,
                   axis_eps: float = AXIS_EPS) -> Tensor:
    """Quantizer output for encoder rows ``e`` and codeword rows ``q`` under the named gradient estimator.

    e: (N, d), differentiable. q: (N, d), the codewords (no gradient flows into q here; the codebook learns
    from the codebook loss). Returns (N, d) in e's dtype: value exactly q, gradient per ``gradient``.
    """
    check_gradient(gradient)
    if gradient == "ste":
        return straight_through(e, q)
    if e.shape != q.shape or e.dim() != 2:
        raise ValueError(f"rotation_trick expects two (N, d) tensors of one shape, got {tuple(e.shape)} and {tuple(q.shape)}")
    out_dtype = e.dtype
    q_val = q.detach().to(out_dtype)

    # fp32 at least (fp16 norms overflow above ~256 and lose the direction of small vectors); fp64 stays fp64.
    work = torch.float64 if e.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=e.device.type, enabled=False):
        e32 = e.to(work)
        q32 = q.detach().to(work)
        # Norms for the mask are taken off the graph: a norm's backward at 0 or inf is NaN even when masked.
        e_norm = torch.linalg.vector_norm(e32.detach(), dim=-1, keepdim=True)
        q_norm = torch.linalg.vector_norm(q32, dim=-1, keepdim=True)
        ok = (e_norm > eps) & (q_norm > eps) & torch.isfinite(e_norm) & torch.isfinite(q_norm)
        # Degenerate rows get a harmless stand-in so that no branch below divides by zero; torch.where then
        # routes them to straight-through.
        ones = torch.ones_like(e32)
        e_safe = torch.where(ok, e32, ones)
        q_safe = torch.where(ok, q32, ones)
        e_norm_safe = torch.linalg.vector_norm(e_safe, dim=-1, keepdim=True)
        q_norm_safe = torch.linalg.vector_norm(q_safe, dim=-1, keepdim=True)

        u_sg = (e_safe / e_norm_safe).detach()
        q_hat = q_safe / q_norm_safe
        if gradient == "reflection":
            diff = u_sg - q_hat
            diff_norm = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
            # u == q^ already: the identity maps u onto q^, so v = 0.
            v = torch.where(diff_norm > axis_eps, diff / diff_norm.clamp_min(axis_eps), torch.zeros_like(diff))
        else:
            s = u_sg + q_hat
            s_norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
            ok = ok & (s_norm > axis_eps)
            w = s / s_norm.clamp_min(axis_eps)

        if gradient == "rotation":
            # sg[(|q|/|e|) R] e: R and the scale are constants, e carries the gradient.
            t = (q_norm_safe / e_norm_safe).detach() * rotate(e_safe, u_sg, q_hat, w)
        else:
            # The released code normalises e with gradient, then applies constant R (or H) and |q|.
            u = e_safe / e_norm_safe
            if gradient == "reflection":
                t = q_norm_safe * reflect(u, v)
            elif gradient == "rotation_released":
                t = q_norm_safe * rotate(u, u_sg, q_hat, w)
            else:  # rotation_unscaled
                t = rotate(u, u_sg, q_hat, w)
        delta = _ZeroWithGradient.apply(torch.where(ok, t, e32))
    # delta is exactly zero in value, so the output is the codeword itself; its gradient is the estimator's.
    return q_val + delta.to(out_dtype)


class _ZeroWithGradient(torch.autograd.Function):
    """Value 0, gradient identity: ``x - x.detach()`` without its NaN for infinite x."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad
