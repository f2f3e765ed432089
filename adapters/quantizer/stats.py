"""Codebook statistics cheap enough to leave on: per-batch and accumulated usage, perplexity, quantization error.

Definitions (the paper's, ../shared/reference/paper_tables.md): codebook usage is the fraction of codebook vectors
used by a batch; quantization error is the mean over vectors of ||e - q||^2 (in the space the code is looked up in:
l2-normalised for ViT-VQGAN). Perplexity is exp(entropy) of the code histogram.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor


def perplexity_from_counts(counts: Tensor) -> Tensor:
    """exp(-sum p log p) of a histogram. counts: (K,) -> 0-d float tensor (0 for an empty histogram)."""
    counts = counts.double()
    total = counts.sum()
    p = counts / total.clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    # torch.where, not an `if` on a device tensor: no host sync on every training forward
    return torch.where(total > 0, torch.exp(entropy), torch.zeros_like(entropy)).float()


def summarize(counts: Tensor, err_sum: Tensor, n_vectors: Tensor) -> dict[str, Tensor]:
    """Statistics of one histogram. counts: (K,), err_sum and n_vectors: 0-d. Returns 0-d float tensors."""
    used = (counts > 0).sum()
    k = counts.numel()
    return {
        "usage": used.float() / k,
        "used_codes": used.float(),
        "dead_codes": (k - used).float(),
        "perplexity": perplexity_from_counts(counts),
        "quant_error": (err_sum.double() / n_vectors.clamp_min(1).double()).float(),
    }


class CodebookStats:
    """Keeps a code histogram and the summed quantization error since the last reset.

    Deliberately not an ``nn.Module`` with buffers: DDP broadcasts every buffer (persistent or not) from rank 0
    before each forward, which would overwrite the other ranks' counts. The tensors follow the device of the
    indices they are given, and never enter a state dict.
    """

    def __init__(self, n_codes: int, device: Optional[torch.device | str] = None) -> None:
        self.n_codes = n_codes
        self.code_counts = torch.zeros(n_codes, dtype=torch.long, device=device)
        self.err_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.n_vectors = torch.zeros((), dtype=torch.long, device=device)
        self.last: dict[str, Tensor] = {}

    def to(self, device: torch.device | str) -> "CodebookStats":
        """Move the accumulators to ``device`` (in place); returns self."""
        self.code_counts = self.code_counts.to(device)
        self.err_sum = self.err_sum.to(device)
        self.n_vectors = self.n_vectors.to(device)
        return self

    @torch.no_grad()
    def update(self, indices: Tensor, e: Tensor, q: Tensor) -> dict[str, Tensor]:
        """Record one batch. indices: (N,) codebook rows; e, q: (N, d) lookup-space vectors. Returns batch stats."""
        if self.code_counts.device != indices.device:
            self.to(indices.device)
        counts = torch.bincount(indices.reshape(-1), minlength=self.n_codes)
        err = ((e.detach().float() - q.detach().float()) ** 2).sum(dim=-1)
        err_sum = err.sum().double()
        n = torch.tensor(err.numel(), device=err.device)
        self.code_counts += counts
        self.err_sum += err_sum
        self.n_vectors += n
        self.last = summarize(counts, err_sum, n)
        return self.last

    def reset(self) -> None:
        self.code_counts.zero_()
        self.err_sum.zero_()
        self.n_vectors.zero_()

    @torch.no_grad()
    def compute(self, reset: bool = True) -> dict[str, Tensor]:
        """Accumulated statistics, summed over ranks when torch.distributed is initialised.

        Every rank must call this (it issues one all_reduce), whatever it saw; then every rank gets the same numbers.
        """
        counts = self.code_counts.clone()
        packed = torch.stack([self.err_sum, self.n_vectors.double()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only (a rank may not have run a batch yet)
                device = torch.device("cuda", torch.cuda.current_device())
                counts, packed = counts.to(device), packed.to(device)
            dist.all_reduce(counts)
            dist.all_reduce(packed)
        out = summarize(counts, packed[0], packed[1])
        out["code_counts"] = counts
        if reset:
            self.reset()
        return out


def codebook_log_dict(stats: Mapping[str, Tensor], split: str) -> dict[str, Tensor]:
    """Lightning log keys for a stats dict: ``{split}/codebook_usage``, ``{split}/quant_error``, ... (scalars only);
    ``{split}/restarted_codes`` where the quantizer restarts dead codes."""
    names = {"usage": "codebook_usage", "quant_error": "quant_error", "perplexity": "perplexity",
             "used_codes": "used_codes", "dead_codes": "dead_codes",
             "restarted_codes": "restarted_codes"}  # dead-code restarts in the batch (only when they are on)
    return {f"{split}/{names[k]}": v for k, v in stats.items() if k in names}
