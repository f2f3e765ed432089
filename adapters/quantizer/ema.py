"""EMA codebook (``codebook_update: ema``, VQ-VAE-2 / vector-quantize-pytorch's ``decay``) and the running code counts
that dead-code restarts read (``restarts.py``).

With K codes, decay g, a batch whose vector e_i (lookup space) is assigned code k_i, b_k = #{i: k_i = k}:

=================  ===============================================================================================
counts             n_k <- g n_k + (1 - g) b_k                      (``counts``, (K,); all ranks' b summed first)
sums               s_k <- g s_k + (1 - g) sum_{i: k_i = k} e_i      (``sums``, (K, d); ``codebook_update: ema`` only)
codebook           c_k = s_k / n~_k,  n~_k = (n_k + eps) / (sum_j n_j + K eps) * sum_j n_j: Laplace smoothing (as
                   VQ-VAE-2 and vector-quantize-pytorch), so a code whose count decays to 0 is never divided by 0; its
                   codeword shrinks toward 0 with s_k instead (and a dead-code restart, if on, brings it back).
use_norm           e_i are the l2-normalised encoder outputs (the space the code is looked up in) and c_k is
                   renormalised after the update: vector-quantize-pytorch's ``use_cosine_sim`` codebook, one spherical
                   k-means step per batch. The stored codewords are then unit vectors; the lookup is unchanged.
start              n_k = 1, s_k = c_k (c_k normalised in ``use_norm`` mode): the first smoothed mean is the codebook
                   itself, as vector-quantize-pytorch starts. The same after a k-means init sets the codebook, and
                   when a state dict brings a codebook without EMA state (a plain or an upstream checkpoint).
non-finite rows    left out of b and s: one NaN encoder output must not turn a codeword into NaN (the run stops on
                   its NaN loss; the codebook it saved stays good).
DDP                b and the per-code sums are all-reduced (one collective, (K, d + 1)) before the update, so every
                   rank holds the same counts, sums and codebook; no rank skips it.
=================  ===============================================================================================

The update runs in ``no_grad`` after the forward has picked its codes: the output of a forward is the codeword it
searched, the codebook after it is the updated one (as vector-quantize-pytorch). ``steps`` counts the updates (the
restarts' ``dead_code_every`` and their random draws read it), so a resumed run continues exactly.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

CODEBOOK_UPDATES: tuple[str, ...] = ("gradient", "ema")


def check_codebook_update(codebook_update: str, ema_decay: float, ema_eps: float) -> str:
    """Return ``codebook_update`` if the three options are valid, else raise one ValueError naming the option."""
    if codebook_update not in CODEBOOK_UPDATES:
        raise ValueError(f"unknown codebook_update {codebook_update!r}: choose one of {', '.join(CODEBOOK_UPDATES)}")
    if not isinstance(ema_decay, (int, float)) or not 0.0 < float(ema_decay) < 1.0:
        raise ValueError(f"ema_decay must be a number strictly between 0 and 1 (e.g. 0.99), got {ema_decay!r}")
    if not isinstance(ema_eps, (int, float)) or not (math.isfinite(ema_eps) and ema_eps > 0):
        raise ValueError(f"ema_eps must be a positive number (Laplace smoothing, e.g. 1e-5), got {ema_eps!r}")
    return codebook_update


def laplace_smoothed(counts: Tensor, eps: float) -> Tensor:
    """(K,) running counts -> (K,) Laplace-smoothed counts with the same total (vector-quantize-pytorch's formula)."""
    total = counts.sum()
    return (counts + eps) / (total + counts.numel() * eps) * total


def batch_statistics(indices: Tensor, x: Tensor, n_codes: int, with_sums: bool) -> tuple[Tensor, Tensor | None]:
    """Per-code counts (K,) and, with ``with_sums``, sums (K, d) of rows x (N, d) assigned ``indices`` (N,), summed
    over ranks under torch.distributed. Rows with a NaN or an infinity are left out."""
    finite = torch.isfinite(x).all(dim=1)
    weight = finite.to(x.dtype)
    counts = torch.zeros(n_codes, dtype=x.dtype, device=x.device).index_add_(0, indices, weight)
    packed = counts.unsqueeze(1)
    if with_sums:
        sums = torch.zeros(n_codes, x.shape[1], dtype=x.dtype, device=x.device)
        sums.index_add_(0, indices, torch.where(finite.unsqueeze(1), x, torch.zeros_like(x)))
        packed = torch.cat([packed, sums], dim=1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
    return packed[:, 0], (packed[:, 1:] if with_sums else None)


def ema_codebook(counts: Tensor, sums: Tensor, eps: float, spherical: bool) -> Tensor:
    """(K,), (K, d) -> (K, d) codebook s_k / n~_k (unit rows when ``spherical``). An all-zero count total (no vector
    ever counted) keeps s_k itself rather than dividing by zero."""
    smoothed = laplace_smoothed(counts, eps).unsqueeze(1)
    codebook = torch.where(smoothed > 0, sums / smoothed.clamp_min(torch.finfo(sums.dtype).tiny), sums)
    return F.normalize(codebook, dim=1) if spherical else codebook


class CodeEMA(nn.Module):
    """Running per-code counts (and, for an EMA codebook, sums): buffers ``counts`` (K,), ``sums`` (K, d), ``steps``.

    Present only when an option needs it (``codebook_update: ema`` or ``dead_code_threshold > 0``), so the default
    quantizer's state dict is upstream's.
    """

    def __init__(self, n_codes: int, dim: int, with_sums: bool, decay: float, eps: float) -> None:
        super().__init__()
        self.n_codes, self.dim, self.with_sums = n_codes, dim, bool(with_sums)
        self.decay, self.eps = float(decay), float(eps)
        self.register_buffer("counts", torch.ones(n_codes))
        if self.with_sums:
            self.register_buffer("sums", torch.zeros(n_codes, dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def start_state(self, codebook: Tensor) -> dict[str, Tensor]:
        """The state that goes with a codebook (K, d) given in lookup space: one count per code at its codeword."""
        state = {"counts": torch.ones(self.n_codes, dtype=self.counts.dtype, device=self.counts.device),
                 "steps": torch.zeros((), dtype=torch.long, device=self.steps.device)}
        if self.with_sums:
            state["sums"] = codebook.detach().to(device=self.sums.device, dtype=self.sums.dtype).clone()
        return state

    @torch.no_grad()
    def reset(self, codebook: Tensor) -> None:
        """Start over from ``codebook`` (K, d), lookup space (after a k-means init sets it)."""
        for name, value in self.start_state(codebook).items():
            getattr(self, name).copy_(value)

    @torch.no_grad()
    def update(self, indices: Tensor, x: Tensor) -> None:
        """One batch: indices (N,), lookup-space rows x (N, d). Collective under torch.distributed."""
        counts, sums = batch_statistics(indices, x.detach().to(self.counts.dtype), self.n_codes, self.with_sums)
        self.counts.lerp_(counts, 1.0 - self.decay)
        if self.with_sums:
            self.sums.lerp_(sums, 1.0 - self.decay)
        self.steps += 1

    def codebook(self, spherical: bool) -> Tensor:
        """(K, d) the EMA codebook of the current state (``with_sums`` only)."""
        return ema_codebook(self.counts, self.sums, self.eps, spherical)

    @torch.no_grad()
    def restart(self, codes: Tensor, rows: Tensor, count: float) -> None:
        """Codes (n,) restarted at rows (n, d): their count is reset to ``count`` and their sum to rows * count, so the
        next smoothed mean starts at the new codeword (vector-quantize-pytorch's ``reset_cluster_size``)."""
        self.counts[codes] = count
        if self.with_sums:
            self.sums[codes] = rows.to(self.sums.dtype) * count
