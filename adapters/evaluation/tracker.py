"""Codebook statistics of one evaluation pass: the quantizer's own when it keeps them, else a forward hook's."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from adapters.evaluation.distributed import all_reduce_cpu
from adapters.evaluation.model_loading import get_quantizer


def quantizer_info(model: nn.Module) -> dict[str, Any]:
    """Class, estimator ('ste', 'rotation', ..., 'gumbel'), codebook size and dimension of the model's quantizer."""
    q = get_quantizer(model)
    cls = f"{type(q).__module__}.{type(q).__name__}"
    gumbel = "gumbel" in type(q).__name__.lower()
    gradient = "gumbel" if gumbel else str(getattr(q, "gradient", "ste"))
    n_embed = getattr(q, "n_e", None) or getattr(q, "n_embed", None)
    e_dim = getattr(q, "e_dim", None) or getattr(q, "embed_dim", None)
    return {"model_target": f"{type(model).__module__}.{type(model).__name__}", "quantizer": cls,
            "gradient": gradient, "n_embed": int(n_embed) if n_embed else None,
            "embed_dim": int(e_dim) if e_dim else None}


class CodebookTracker:
    """Per-batch and whole-set codebook statistics of one quantizer during an evaluation pass.

    Uses the quantizer's own statistics (``adapters.quantizer``) when it keeps them; otherwise a forward hook
    computes the same quantities from the quantizer's input and indices (taming ``VectorQuantizer2``, enhancing
    ``VectorQuantizer``; Gumbel quantizers give usage only, as their input is not a vector to compare with a code).
    The hook also records the latent shape.
    """

    def __init__(self, quantizer: nn.Module, n_embed: int) -> None:
        from adapters.quantizer import CodebookStats

        self.q = quantizer
        self.own = hasattr(quantizer, "epoch_stats") and bool(getattr(quantizer, "track_stats", True))
        self.gumbel = "gumbel" in type(quantizer).__name__.lower()
        self.n_embed = n_embed
        self.fallback = CodebookStats(n_embed)
        self.latent_shape: Optional[tuple[int, ...]] = None
        self._batch: Optional[dict[str, Tensor]] = None
        self.per_batch_usage: list[float] = []
        self.per_batch_quant_error: list[float] = []
        if self.own:
            quantizer.reset_stats()
        self._handle = quantizer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        z = inputs[0]
        z_q = output[0]
        self.latent_shape = tuple(z_q.shape[1:])
        if self.own:
            return
        ind = output[2]
        if isinstance(ind, (tuple, list)):  # taming: (perplexity, min_encodings, indices)
            ind = ind[2]
        ind = ind.reshape(z.shape[0], -1)
        if getattr(module, "remap", None) is not None and hasattr(module, "unmap_to_all"):
            ind = module.unmap_to_all(ind)
        ind = ind.reshape(-1).long()
        if self.gumbel or not hasattr(module, "embedding"):
            zeros = torch.zeros(ind.numel(), 1, device=ind.device)
            self._batch = self.fallback.update(ind, zeros, zeros)
            return
        weight = module.embedding.weight
        d = weight.shape[1]
        if z.dim() == 4 and z.shape[1] == d:  # taming: (B, C, H, W)
            e = z.permute(0, 2, 3, 1).reshape(-1, d)
        else:  # enhancing: (B, T, C)
            e = z.reshape(-1, d)
        q = weight[ind]
        norm = getattr(module, "norm", None)
        if callable(norm) and not isinstance(norm, nn.Module):  # enhancing's l2-normalisation lambda
            e, q = norm(e), norm(q)
        self._batch = self.fallback.update(ind, e.float(), q.float())

    def after_batch(self) -> None:
        """Record the statistics of the batch just quantized (call once per batch, after the forward)."""
        s = self.q.last_stats if self.own else self._batch
        if not s:
            raise RuntimeError("the quantizer ran no forward in this batch: cannot record codebook statistics")
        self.per_batch_usage.append(float(s["usage"]))
        self.per_batch_quant_error.append(float(s["quant_error"]))

    def finish(self) -> tuple[dict[str, Any], list[int]]:
        """Whole-set statistics (summed over ranks) and code counts. Every rank must call it."""
        self._handle.remove()
        stats = self.q.epoch_stats(reset=True) if self.own else self.fallback.compute(reset=True)
        counts = stats["code_counts"].cpu().long()
        usage = torch.tensor(self.per_batch_usage, dtype=torch.float64)
        packed = torch.tensor([usage.sum().item(), (usage ** 2).sum().item(), float(usage.numel())],
                              dtype=torch.float64)
        packed = all_reduce_cpu(packed)
        n_b = max(packed[2].item(), 1.0)
        mean = packed[0].item() / n_b
        var = max(packed[1].item() / n_b - mean ** 2, 0.0)
        out = {
            "codebook_usage_per_batch": mean,
            "codebook_usage_per_batch_std": math.sqrt(var),
            "codebook_usage_whole_set": float(stats["usage"]),
            "used_codes_whole_set": int(stats["used_codes"]),
            "perplexity_whole_set": float(stats["perplexity"]),
            "quant_error": None if self.gumbel else float(stats["quant_error"]),
            "num_batches": int(packed[2].item()),
        }
        return out, counts.tolist()
