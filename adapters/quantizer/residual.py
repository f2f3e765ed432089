"""Residual stages with the rotation trick: enhancing's ``VectorQuantizer(use_residual=True, num_quantizers=N)``.

Upstream (``BaseQuantizer.forward``) quantizes the encoder output e in N stages sharing one codebook: stage k looks
up the nearest (l2-normalised, with ``use_norm``) codeword q_k of the residual r_k (r_1 = e, r_{k+1} = r_k - q_k),
its loss is the one-lookup loss on r_k, the output is the sum s = q_1 + ... + q_N and the loss is the stages' mean.
Its residuals are detached from the encoder (no stage loss reaches it) but not from the codebook (stage k's loss
reaches earlier stages' codewords through r_k); the straight-through copy is applied once, ``e + sg(s - e)``.
``ResidualNormRotationQuantizer`` keeps all of that and puts the estimator where ``rotation_scope`` says:

=========  =========================================================================================================
``total``  (default; upstream's place for its straight-through copy) once, from e onto the summed codeword s:
           grad_e = J(e, s)^T grad_s.
``stage``  per stage, from the residual r_k onto q_k: out_k = est(r_k, q_k), r_{k+1} = r_k - out_k, s = sum out_k.
           The residual carries the encoder's gradient through every earlier stage's estimator, so with the
           stages' Jacobians J_k = J(r_k, q_k): grad_e = M^T grad_s, M = sum_k J_k (I - J_{k-1}) ... (I - J_1).
=========  =========================================================================================================

J(e, q) is the Jacobian of the estimator's output (``functional``'s table gives each one); it is never formed here:
autograd applies it in O(d) per row. Why the ``stage`` chain and not vector-quantize-pytorch's default, detached
residuals (``residual - quantized.detach()``, so grad_e = sum_k J_k^T grad_s): with straight-through (J = I) the chain gives
grad_e = grad_s, upstream's, whatever N, where the detached residuals give N grad_s; so the two scopes differ only in
where the rotation is applied, never in the gradient's scale. (vector-quantize-pytorch's ``ResidualVQ`` computes the
same chain with ``quant_grad_frac=1``; tests/test_residual.py uses it as the peer.) With ``gradient="ste"`` both
scopes are therefore the same estimator, and both compute upstream's ``e + sg(s - e)`` bit for bit.

Forward value: exactly the sum of the stages' codewords, summed in upstream's order, for every rotation estimator and
both scopes (``ste``: upstream's expression). Indices: (B, T, N); the loss is upstream's, and so is the codebook's
gradient (up to float rounding: each stage's codeword is gathered twice, for its loss and for the residual).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import Tensor

from .functional import rotation_trick
from .modules import NormRotationQuantizer

ROTATION_SCOPES: tuple[str, ...] = ("total", "stage")
# issue 24's codebook remedies (constructor options of the base class) and their "off" values: they update or
# reparameterise the codebook per lookup, which N lookups per forward would each do again; refused until defined.
_UNSUPPORTED_WITH_STAGES = {"codebook_update": ("gradient",), "codebook_param": ("plain",),
                            "dead_code_threshold": (0, 0.0, None)}


def check_rotation_scope(scope: str) -> str:
    """Return ``scope`` if it names a rotation scope, else raise one ValueError naming the option and its values."""
    if scope not in ROTATION_SCOPES:
        raise ValueError(f"unknown rotation_scope {scope!r}: choose one of {', '.join(ROTATION_SCOPES)}")
    return scope


class ResidualNormRotationQuantizer(NormRotationQuantizer):
    """enhancing-transformers' ``VectorQuantizer(use_residual=True, num_quantizers=N)`` with a gradient estimator.

    Same arguments as ``NormRotationQuantizer`` (its options pass through) plus ``num_quantizers`` (N >= 1 stages,
    required) and ``rotation_scope`` (``total`` | ``stage``, see the module docstring). Same state-dict keys as
    upstream (``embedding.weight``: one codebook shared by the stages). ``forward(z)``: z (B, T, C) ->
    (z_q (B, T, C), loss (0-d, the stages' mean), indices (B, T, N)).

    Statistics (``last_stats``, ``epoch_stats()``): codes counted over every stage (one codebook: a code is used
    when any stage picks it); quantization error = mean ||e - s||^2, what the N stages leave of the raw encoder
    output (upstream's residuals are raw: r_2 = e - q_1 even with ``use_norm``). A pending k-means init fits the
    first stage's input, the encoder outputs.
    """

    def __init__(self, embed_dim: int, n_embed: int, beta: float = 0.25, use_norm: bool = True,
                 use_residual: bool = True, num_quantizers: Optional[int] = None, rotation_scope: str = "total",
                 **kwargs: Any) -> None:
        base = inspect.signature(NormRotationQuantizer.__init__).parameters
        unknown = sorted(k for k in kwargs if k not in base or k in ("self", "kwargs"))
        if unknown:  # one error listing this class's options and those it passes on
            own = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "kwargs")]
            valid = own + [p for p in base if p not in (*own, "self", "kwargs")]
            raise ValueError(f"unknown quantizer option(s) {unknown} for {type(self).__name__}; valid: "
                             f"{', '.join(valid)}")
        if not use_residual:
            raise ValueError("use_residual=False is one lookup: build NormRotationQuantizer for it")
        if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be a positive number of residual stages with use_residual=True, "
                             f"got {num_quantizers!r}")
        for option, off in _UNSUPPORTED_WITH_STAGES.items():
            if option in kwargs and kwargs[option] not in off:
                raise ValueError(f"{option}={kwargs[option]!r} is not supported with residual stages "
                                 f"(use_residual=True): leave it at {off[0]!r}, or use one lookup "
                                 f"(use_residual: false)")
        scope = check_rotation_scope(rotation_scope)
        super().__init__(embed_dim, n_embed, beta, use_norm=use_norm, num_quantizers=num_quantizers, **kwargs)
        self.use_residual = True
        self.rotation_scope = scope

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """z: (B, T, C) -> (z_q (B, T, C), loss (0-d), indices (B, T, num_quantizers))."""
        if z.shape[-1] != self.embed_dim:
            raise ValueError(f"expected z with last dimension {self.embed_dim}, got {tuple(z.shape)}")
        e = z.reshape(-1, self.embed_dim)
        residual = e.detach().clone()  # upstream's: off the encoder's graph, on the codebook's through earlier q_k
        r = e  # scope "stage": the residual on the encoder's graph, through every earlier stage's estimator
        per_stage = self.rotation_scope == "stage" and self.gradient != "ste"  # ste: one estimator, see above
        s = torch.zeros_like(e)  # summed as upstream does (z_q.add_), so the value is upstream's bit for bit
        losses: list[Tensor] = []
        indices: list[Tensor] = []
        track, self.track_stats = self.track_stats, False  # counted once below, over the whole forward
        try:
            for _ in range(self.num_quantizers):
                # quantize_flat: k-means init, search and the stage's loss on upstream's residual. Its own output
                # (an estimator onto this stage's detached residual) is not used: upstream's stage returns the
                # codeword itself, whose codebook gradient the next stages' losses reach through the residual.
                _, loss, idx = self.quantize_flat(residual)
                q = self.norm(self.embedding(idx))
                if per_stage:
                    out = rotation_trick(r, q, self.gradient)  # value exactly q; gradient to e only
                    r = r - out
                    s = s + out
                else:
                    s = s + q
                residual = residual - q
                losses.append(loss)
                indices.append(idx)
        finally:
            self.track_stats = track
        codes = torch.stack(indices, dim=-1)  # (B*T, N)
        if self.track_stats:
            self.stats.update(codes.reshape(-1), e, s)
        out = s if per_stage else rotation_trick(e, s, self.gradient)
        return out.view(z.shape), torch.stack(losses, dim=-1).mean(), codes.view(*z.shape[:-1], -1)


__all__ = ["ROTATION_SCOPES", "ResidualNormRotationQuantizer", "check_rotation_scope"]
