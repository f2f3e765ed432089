"""Dead-code restarts (``dead_code_threshold``, vector-quantize-pytorch's ``threshold_ema_dead_code``).

=================  ===============================================================================================
dead               a code whose running count n_k (``ema.CodeEMA.counts``: the EMA of its per-batch counts over all
                   ranks, decay ``ema_decay``) is below ``dead_code_threshold`` after this batch's update. With
                   ``codebook_update: ema`` it is the EMA codebook's own count; with ``gradient`` the same EMA is kept
                   for this purpose only (the optimizer still trains the codebook). Counts start at 1, as
                   vector-quantize-pytorch's ``cluster_size``: a threshold above ``ema_decay`` restarts every code
                   the first training batch leaves unused.
when               every ``dead_code_every`` training forwards (counted by ``CodeEMA.steps``), after the update.
restart            each dead code becomes a distinct encoder output of the current batch, drawn at random (lookup
                   space: l2-normalised in ``use_norm`` mode; non-finite rows never drawn). With more dead codes than
                   rows, a random subset of them is restarted now and the rest at a later check (as the peer). A
                   restarted code's count is reset to the threshold and its EMA sum to codeword x threshold (so the
                   EMA codebook starts at the new codeword, and the code is not restarted again until its count
                   decays below the threshold without use).
DDP                rank 0 decides and draws from its own batch, then broadcasts the codes and rows; every rank writes
                   the same rows. Counts are all-reduced already, so every rank would find the same dead codes.
randomness         a generator of its own, seeded from the run's seed and ``steps``, never the global stream: the
                   run's crops and dropout are those of the run without restarts, and a resumed run draws exactly
                   what the uninterrupted one drew.
cost               host syncs: the step count on every training forward, whether any code is dead at a check;
                   under DDP one broadcast of the number restarted per check, of the codes and rows only when
                   there are some. Nothing of this runs with restarts off.
=================  ===============================================================================================
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .kmeans import derived_seed


def check_restarts(dead_code_threshold: float, dead_code_every: int) -> tuple[float, int]:
    """Return (threshold, every) if valid, else raise one ValueError naming the option and what it accepts."""
    if isinstance(dead_code_threshold, bool) or not isinstance(dead_code_threshold, (int, float)) \
            or not math.isfinite(dead_code_threshold) or dead_code_threshold < 0:
        raise ValueError(f"dead_code_threshold must be a finite number >= 0 (0 = no restarts), got "
                         f"{dead_code_threshold!r}")
    if isinstance(dead_code_every, bool) or not isinstance(dead_code_every, int) or dead_code_every < 1:
        raise ValueError(f"dead_code_every must be an integer >= 1 (check every N training forwards), got "
                         f"{dead_code_every!r}")
    return float(dead_code_threshold), int(dead_code_every)


def restart_seed(run_seed: int, step: int) -> int:
    """The restart draws' seed at ``step``: the run's seed and the step mixed (not the global stream replayed, not
    the k-means init's seed)."""
    return derived_seed(run_seed, 0x72657374, step)


def pick_restarts(dead: Tensor, x: Tensor, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Dead codes (K,) bool and batch rows x (N, d) -> (codes (n,), rows (n, d)): min(#dead, #finite rows) dead codes,
    each paired with a distinct random finite row of x."""
    rows = x[torch.isfinite(x).all(dim=1)]
    codes = dead.nonzero().squeeze(1)
    n = min(codes.numel(), rows.shape[0])
    if n < codes.numel():  # more dead codes than rows: a random subset now, the others later
        codes = codes[torch.randperm(codes.numel(), generator=generator, device=codes.device)[:n]]
    picked = torch.randperm(rows.shape[0], generator=generator, device=rows.device)[:n]
    return codes, rows[picked]


def dead_code_restarts(counts: Tensor, threshold: float, x: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Which codes restart and at which rows: decided on rank 0 (its counts, its batch x (N, d)), broadcast to every
    rank under torch.distributed. Returns (codes (n,), rows (n, d)) on x's device, the same on every rank."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    codes = torch.zeros(0, dtype=torch.long, device=x.device)
    rows = x.new_zeros(0, x.shape[1])
    if not distributed or dist.get_rank() == 0:
        dead = counts < threshold
        if bool(dead.any()):
            generator = torch.Generator(device=x.device).manual_seed(seed)
            codes, rows = pick_restarts(dead.to(x.device), x.detach(), generator)
    if distributed:
        n = torch.tensor([codes.numel()], dtype=torch.long, device=x.device)
        dist.broadcast(n, src=0)
        if int(n.item()) == 0:
            return codes, rows
        if dist.get_rank() != 0:
            codes = torch.empty(int(n.item()), dtype=torch.long, device=x.device)
            rows = x.new_empty(int(n.item()), x.shape[1])
        rows = rows.contiguous()
        dist.broadcast(codes, src=0)
        dist.broadcast(rows, src=0)
    return codes, rows
