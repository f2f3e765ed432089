"""Codebook initialisation from encoder outputs: k-means++ seeding plus a few Lloyd iterations.

Why: taming's ``uniform(-1/K, 1/K)`` draw gives codewords of norm ~1e-4 against encoder outputs of norm 0.1 to 1, so
nearest-code search can reach only the few codes on the codebook's convex hull, whatever the gradient estimator
(docs/report/README.md, item 3). Placing the codebook on the encoder's first batch removes that confound.

=================  ================================================================================================
N >= K vectors     k-means++ seeding (D^2 sampling, Arthur & Vassilvitskii 2007) then ``iters`` Lloyd iterations;
                   a cluster that loses all its vectors keeps its centre (it is still a valid codeword).
N < K vectors      every vector becomes one codeword (in random order), and the remaining K - N codewords are
                   vectors drawn again with replacement plus a small Gaussian jitter (``jitter`` x the per-dimension
                   standard deviation of the batch). Why not gather several batches: the codebook must be set before
                   the first optimizer step (a later init would discard what the codebook learnt), and batches from
                   an encoder that has not moved are as good as one batch of the same size. The jitter keeps the
                   copies distinct, so nearest-code search can split them later; all codewords start at the
                   encoder's scale, which is what the init is for.
spherical          ``use_norm`` quantizers (ViT-VQGAN) compare l2-normalised vectors: the input is normalised, the
                   seeding and the assignment use euclidean distance between unit vectors (a monotone function of
                   cosine), and every centre is renormalised after its update (spherical k-means).
=================  ================================================================================================

vector-quantize-pytorch's ``kmeans`` (used by its ``kmeans_init=True``) is the reference we compared with
(scripts/bench_kmeans_init.py): it seeds by sampling K vectors uniformly (with replacement when N < K) and runs
Lloyd iterations with an N x K distance matrix. Here the seeding is k-means++ and the assignment is the project's
blocked nearest-code search, so memory stays O(N + K) blocks whatever N x K is.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .search import find_nearest

CODEBOOK_INITS: tuple[str, ...] = ("upstream", "kmeans")


def check_codebook_init(codebook_init: str) -> str:
    """Return ``codebook_init`` if it names an initialisation, else raise one ValueError listing the valid ones."""
    if codebook_init not in CODEBOOK_INITS:
        raise ValueError(f"unknown codebook_init {codebook_init!r}: choose one of {', '.join(CODEBOOK_INITS)}")
    return codebook_init


def _nearest(x: Tensor, centres: Tensor) -> Tensor:
    """(N, d), (K, d) -> (N,) index of the nearest centre, by the project's blocked search (bounded memory)."""
    return find_nearest(x, centres, "blocked")


def kmeans_pp_seed(x: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """k-means++ seeding: (N, d) float, k <= N -> (k, d) rows of x, each drawn with probability ~ D^2.

    O(k N d) time, O(N) extra memory. A batch of identical vectors (all D^2 = 0) falls back to uniform draws.
    """
    n = x.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k-means++ needs 0 < k <= N vectors, got k={k}, N={n}")
    idx = torch.empty(k, dtype=torch.long, device=x.device)
    idx[0] = torch.randint(n, (1,), generator=generator, device=x.device)
    d2 = (x - x[idx[0]]).pow(2).sum(dim=1)
    for i in range(1, k):
        total = d2.sum()
        if not torch.isfinite(total) or total <= 0:
            weights = torch.ones_like(d2)
        else:
            weights = d2
        j = torch.multinomial(weights, 1, generator=generator)
        idx[i] = j[0]
        d2 = torch.minimum(d2, (x - x[j]).pow(2).sum(dim=1))
    return x[idx].clone()


def lloyd(x: Tensor, centres: Tensor, iters: int, spherical: bool = False) -> Tensor:
    """``iters`` Lloyd iterations from ``centres``: (N, d), (K, d) -> (K, d). Empty clusters keep their centre."""
    k = centres.shape[0]
    for _ in range(iters):
        assign = _nearest(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        updated = sums / counts.clamp(min=1)
        if spherical:
            updated = F.normalize(updated, dim=1)
        centres = torch.where(counts > 0, updated, centres)
    return centres


def kmeans_codebook(x: Tensor, k: int, iters: int = 10, spherical: bool = False, jitter: float = 0.01,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """A (k, d) codebook from encoder rows x (N, d); see the module docstring for N < k. Computed in float32 at
    least; returned in x's dtype (float64 stays float64). Non-finite rows of x are ignored (none left: ValueError).
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans_codebook expects (N, d) rows, got shape {tuple(x.shape)}")
    if iters < 0:
        raise ValueError(f"kmeans_iters must be >= 0, got {iters}")
    out_dtype = x.dtype
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    x = x[torch.isfinite(x).all(dim=1)]
    if x.shape[0] == 0:
        raise ValueError("k-means codebook init got no finite encoder output; the encoder diverged before the first "
                         "step: check the data and the learning rate, or use codebook_init: upstream")
    if spherical:
        x = F.normalize(x, dim=1)
    n = x.shape[0]
    if n <= k:
        perm = torch.randperm(n, generator=generator, device=x.device)
        extra = torch.randint(n, (k - n,), generator=generator, device=x.device)
        noise = torch.randn(k - n, x.shape[1], generator=generator, device=x.device, dtype=x.dtype)
        # std over a single vector is undefined: fall back to the vectors' own scale.
        spread = x.std(dim=0, keepdim=True) if n > 1 else x.abs().clamp(min=1e-6)
        centres = torch.cat([x[perm], x[extra] + jitter * spread * noise])
        if spherical:
            centres = F.normalize(centres, dim=1)
    else:
        centres = lloyd(x, kmeans_pp_seed(x, k, generator), iters, spherical)
    return centres.to(out_dtype)
