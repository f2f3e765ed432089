"""Codebook initialisation from encoder outputs: k-means++ seeding plus a few Lloyd iterations.

Why: taming's ``uniform(-1/K, 1/K)`` draw gives codewords of norm ~1e-4 against encoder outputs of norm 0.1 to 1, so
nearest-code search can reach only the few codes on the codebook's convex hull, whatever the gradient estimator
(docs/report/README.md, item 3). Placing the codebook on the encoder's first batch removes that confound.

=================  ================================================================================================
N >= K vectors     k-means++ seeding (D^2 sampling, Arthur & Vassilvitskii 2007) then ``iters`` Lloyd iterations;
                   a cluster that loses all its vectors keeps its centre (it is still a valid codeword).
N < K vectors      every distinct vector becomes one codeword (in random order), and the remaining K - N are
                   vectors drawn again with replacement plus a small Gaussian jitter (``jitter`` x the per-dimension
                   standard deviation of the batch). Why not gather several batches: the codebook must be set before
                   the first optimizer step (a later init would discard what the codebook learnt), and batches from
                   an encoder that has not moved are as good as one batch of the same size. The jitter keeps the
                   copies distinct, so nearest-code search can split them later; all codewords start at the
                   encoder's scale, which is what the init is for. N counts distinct vectors: equal rows (a flat
                   image region) are one vector, never two equal codewords.
distinct           every returned codeword is distinct (a repeated one could never be chosen: ties go to the lowest
                   index); rows that coincide after Lloyd or rounding are jittered apart.
randomness         only from the ``generator`` passed in; the quantizer passes its own, seeded from the run's seed,
                   so the global stream after the init is the upstream-init twin's (same crops, dropout, ...).
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


def derived_seed(run_seed: int, tag: int, step: Optional[int] = None) -> int:
    """A seed of its own for one use of randomness (``tag``), from the run's seed (and a step): a fixed 64-bit mix
    (golden-ratio multiplier), so that its stream is never the run's global stream replayed. Shared by the k-means
    init and the dead-code restarts (``restarts.restart_seed``)."""
    mixed = int(run_seed) * 0x9E3779B97F4A7C15 + int(tag)
    if step is not None:
        mixed += (int(step) + 1) * 0xBF58476D1CE4E5B9
    return mixed % 2**63


def kmeans_seed(run_seed: int) -> int:
    """The k-means init's own seed from the run's (which would otherwise tie the codebook to the first crops' draws)."""
    return derived_seed(run_seed, 0x6B6D65616E73)


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


def _jitter_duplicates(centres: Tensor, spread: Tensor, jitter: float, spherical: bool,
                       generator: Optional[torch.Generator], tries: int = 8) -> Tensor:
    """Move every row of ``centres`` (K, d) that repeats an earlier row by a small Gaussian jitter until all rows
    are distinct: a repeated codeword can never be chosen (nearest-code ties go to the lowest index)."""
    k = centres.shape[0]
    for _ in range(tries):
        uniq, inverse = torch.unique(centres, dim=0, return_inverse=True)
        if uniq.shape[0] == k:
            return centres
        # the first row of each group of equal rows stays; the others move
        first = torch.full((uniq.shape[0],), k, dtype=torch.long, device=centres.device)
        first.scatter_reduce_(0, inverse, torch.arange(k, device=centres.device), reduce="amin")
        moved = torch.ones(k, dtype=torch.bool, device=centres.device)
        moved[first] = False
        noise = torch.randn(int(moved.sum()), centres.shape[1], generator=generator, device=centres.device,
                            dtype=centres.dtype)
        centres = centres.clone()
        centres[moved] = centres[moved] + jitter * spread * noise
        if spherical:
            centres = F.normalize(centres, dim=1)
    raise RuntimeError(f"k-means init could not make {k} distinct codewords after {tries} jitters; "
                       "the encoder outputs are degenerate: use codebook_init: upstream")


def kmeans_codebook(x: Tensor, k: int, iters: int = 10, spherical: bool = False, jitter: float = 0.01,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """A (k, d) codebook of k distinct rows from encoder rows x (N, d); see the module docstring for N < k. Computed
    in float32 at least; returned in x's dtype (float64 stays float64). Non-finite rows of x are ignored (none left:
    ValueError). Random draws come from ``generator`` only (the global stream when None).
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
    # The jitter's scale: the per-dimension spread of the batch; a dimension (or a batch) with none falls back to the
    # vectors' own scale, so the jitter is never zero.
    scale = x.abs().mean().clamp(min=1e-6)
    spread = x.std(dim=0, keepdim=True) if x.shape[0] > 1 else torch.zeros_like(x[:1])
    spread = torch.where(spread > 1e-6 * scale, spread, scale)
    # Equal rows (a constant image region, repeated crops) would become equal codewords: count distinct vectors.
    distinct = torch.unique(x, dim=0)
    if distinct.shape[0] <= k:
        x = distinct
        n = x.shape[0]
        perm = torch.randperm(n, generator=generator, device=x.device)
        extra = torch.randint(n, (k - n,), generator=generator, device=x.device)
        noise = torch.randn(k - n, x.shape[1], generator=generator, device=x.device, dtype=x.dtype)
        centres = torch.cat([x[perm], x[extra] + jitter * spread * noise])
        if spherical:
            centres = F.normalize(centres, dim=1)
    else:
        # k-means++ never picks a vector at distance 0 from a chosen one while more than k distinct ones remain.
        centres = lloyd(x, kmeans_pp_seed(x, k, generator), iters, spherical)
    # Lloyd can (rarely) move two centres onto one point, and jittered copies can round onto each other.
    return _jitter_duplicates(centres, spread, jitter, spherical, generator).to(out_dtype)
