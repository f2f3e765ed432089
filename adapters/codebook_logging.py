"""Codebook statistics in the Lightning loop: one implementation for RotationVQModel and RotationViTVQ.

The quantizer keeps the numbers (``adapters.quantizer.CodebookStats`` in ``quantizer.stats``, switched by
``quantizer.track_stats``); this mixin decides when they are counted, reset and logged:

- ``train/codebook_usage``, ``train/quant_error``, ``train/perplexity``, ... per batch (the paper's per-batch usage);
- ``train/..._total`` over the training epoch and ``val/..._total`` over a validation run, summed over ranks;
- forwards that repeat a batch (discriminator pass, EMA pass, image logging) are not counted twice;
- a codebook-usage picture beside upstream's logged images.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from adapters.quantizer import CodebookStats, codebook_log_dict


def usage_picture(counts: Tensor) -> Tensor:
    """Codebook usage as an image. counts: (K,) code counts -> (1, 3, h, w) in [0, 1], one pixel per code
    (row-major, h = 2^floor(log2(K)/2)), brightness log(1 + count) / log(1 + max count), black = never used."""
    k = counts.numel()
    h = 2 ** (int(math.log2(max(k, 1))) // 2)
    w = math.ceil(k / h)
    values = torch.log1p(counts.detach().float().cpu())
    values = values / values.max().clamp_min(1e-12)
    grid = torch.zeros(h * w)
    grid[:k] = values
    return grid.view(1, 1, h, w).expand(1, 3, h, w).contiguous()


@contextmanager
def stats_paused(quantizer: Any) -> Iterator[None]:
    """Within the block the quantizer does not count codes (its ``track_stats`` is restored after)."""
    was = quantizer.track_stats
    quantizer.track_stats = False
    try:
        yield
    finally:
        quantizer.track_stats = was


class CodebookLoggingMixin:
    """Lightning hooks logging the statistics of ``getattr(self, codebook_attr)`` (put before the upstream class).

    ``codebook_log_exclude`` names statistics a model does not log (the Gumbel baseline has no quantization error);
    ``usage_picture_range`` maps the usage picture from [0, 1] to the range the model's image logger expects.
    """

    codebook_attr: str = "quantizer"
    codebook_log_exclude: tuple[str, ...] = ()
    usage_picture_range: tuple[float, float] = (0.0, 1.0)

    @property
    def codebook(self) -> Any:
        return getattr(self, self.codebook_attr)

    @property
    def code_stats(self) -> CodebookStats:
        """The quantizer's accumulated histogram and quantization error, this rank's."""
        return self.codebook.stats

    def _no_stats(self) -> Any:
        return stats_paused(self.codebook)

    def _stats_log(self, stats: Mapping[str, Tensor], split: str, suffix: str = "") -> dict[str, Tensor]:
        logs = codebook_log_dict(stats, split)
        return {k + suffix: v.float() for k, v in logs.items()
                if not any(k.endswith("/" + name) for name in self.codebook_log_exclude)}

    def log_codebook_batch(self, split: str, skip: Mapping[str, Any] = ()) -> None:
        """Log the last batch's statistics (keys already in ``skip``, e.g. the loss's own, are left out)."""
        stats = {k: v for k, v in self._stats_log(self.code_stats.last, split).items() if k not in skip}
        if split == "train":
            self.log_dict(stats, prog_bar=False, logger=True, on_step=True, on_epoch=True)
            if "train/codebook_usage" in stats:
                self.log("usage", stats["train/codebook_usage"], prog_bar=True, logger=False, on_step=True,
                         on_epoch=False)
        else:
            self.log_dict(stats, logger=True, on_step=False, on_epoch=True, sync_dist=True)

    def _log_totals(self, split: str) -> None:
        if not self.codebook.track_stats:  # nothing was counted (same config on every rank: no collective skipped)
            return
        stats = self.code_stats.compute(reset=True)  # every rank calls it: it all-reduces
        # already summed over ranks, so rank 0 logs it as it is
        self.log_dict(self._stats_log(stats, split, "_total"), logger=True, on_step=False, on_epoch=True,
                      rank_zero_only=True)

    def on_train_epoch_start(self) -> None:
        self.code_stats.reset()

    def on_train_epoch_end(self) -> None:
        self._log_totals("train")

    def on_validation_epoch_start(self) -> None:
        # Validation runs inside a training epoch: count it in its own histogram, then give the training one back.
        self._train_code_stats = self.code_stats
        self.codebook.stats = CodebookStats(self.code_stats.n_codes, device=self.code_stats.code_counts.device)

    def on_validation_epoch_end(self) -> None:
        self._log_totals("val")
        train_stats = getattr(self, "_train_code_stats", None)
        if train_stats is not None:
            self.codebook.stats = train_stats
            self._train_code_stats = None

    def with_usage_picture(self, log: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add ``codebook_usage`` (the histogram counted so far in this split) to an image-log dict."""
        lo, hi = self.usage_picture_range
        pic = usage_picture(self.code_stats.code_counts)
        scale = max(1, 256 // pic.shape[-1])  # small codebooks: blocks of pixels, so the picture can be seen
        pic = torch.nn.functional.interpolate(pic, scale_factor=scale, mode="nearest") if scale > 1 else pic
        log["codebook_usage"] = (pic * (hi - lo) + lo).to(self.device)
        return log
