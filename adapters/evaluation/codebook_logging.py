"""Codebook statistics in the Lightning loop: one implementation for RotationVQModel and RotationViTVQ.

The quantizer keeps the numbers (``adapters.quantizer.CodebookStats`` in ``quantizer.stats``, switched by
``quantizer.track_stats``); this mixin decides when they are counted, reset and logged:

- ``train/codebook_usage``, ``train/quant_error``, ``train/perplexity``, ... per batch (the paper's per-batch usage);
- ``train/..._total`` over the training epoch and ``val/..._total`` over a validation run, summed over ranks;
- forwards that repeat a batch (discriminator pass, EMA pass, image logging) are not counted twice;
- a codebook-usage figure (code grid with a colour scale, usage curve, title) beside upstream's logged images.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

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


def usage_figure(counts: Tensor, title: str = "Codebook usage", counted_over: str = "") -> Tensor:
    """Codebook usage as a figure that explains itself. counts: (K,) code counts -> (1, 3, H, W) in [0, 1].

    Left: one cell per code (code index = row x width + column, as :func:`usage_picture`), coloured by how often it
    was chosen on a log colour scale, never-used codes grey. Right: the counts sorted from most to least used,
    the usage curve. The title gives codes used of K and the perplexity of the code distribution.
    """
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # off screen: no display, no pyplot state
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    c = counts.detach().double().cpu()
    k = c.numel()
    h = 2 ** (int(math.log2(max(k, 1))) // 2)
    w = math.ceil(k / h)
    grid = torch.full((h * w,), float("nan"), dtype=torch.float64)
    grid[:k] = torch.where(c > 0, c, torch.full_like(c, float("nan")))  # NaN: never used, drawn grey
    used = int((c > 0).sum())
    total = float(c.sum())
    p = c / max(total, 1.0)
    perplexity = math.exp(-float((p[p > 0] * p[p > 0].log()).sum())) if total > 0 else 0.0

    fig = Figure(figsize=(9.6, 3.6), dpi=100)
    canvas = FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.82")
    vmax = max(float(c.max()), 2.0)
    im = left.imshow(grid.view(h, w).numpy(), cmap=cmap, norm=LogNorm(vmin=1, vmax=vmax), interpolation="nearest",
                     aspect="auto" if w / h > 2.5 else "equal")
    left.set_title(f"one cell per code (index = row x {w} + column); grey: never used", fontsize=8)
    left.set_xlabel("column", fontsize=8)
    left.set_ylabel("row", fontsize=8)
    left.tick_params(labelsize=7)
    bar = fig.colorbar(im, ax=left, fraction=0.05, pad=0.02)
    bar.set_label("times chosen (log scale)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ranked = torch.sort(c, descending=True).values.numpy()
    right.plot(range(1, k + 1), ranked, drawstyle="steps-post", color="tab:blue")
    right.set_yscale("symlog", linthresh=1)
    right.set_xlim(1, k)
    right.set_ylim(bottom=0)
    right.axvline(max(used, 1), color="tab:red", linestyle="--", linewidth=1)
    right.text(max(used, 1), vmax, f" {used} used", color="tab:red", fontsize=8, va="top")
    right.set_title("usage curve: codes sorted by use", fontsize=8)
    right.set_xlabel("code rank (1 = most used)", fontsize=8)
    right.set_ylabel("times chosen", fontsize=8)
    right.tick_params(labelsize=7)
    right.grid(True, alpha=0.3)
    head = f"{title}: {used} of {k} codes used ({100.0 * used / max(k, 1):.1f}%), perplexity {perplexity:.1f}"
    if counted_over:
        head += f"\n{int(total)} vectors counted over {counted_over}"
    fig.suptitle(head, fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14, top=0.80, wspace=0.28)  # fixed: also for empty counts
    canvas.draw()
    rgba = torch.from_numpy(np.asarray(canvas.buffer_rgba()).copy())
    return (rgba[..., :3].permute(2, 0, 1).float() / 255.0).unsqueeze(0)


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

    def log(self, name: str, value: Any, *args: Any, batch_size: Optional[int] = None, **kwargs: Any) -> None:
        """Lightning's ``log`` (``log_dict`` calls it too, upstream's steps included), with the batch size of the
        current batch unless one is given: Lightning guessed it from dict batches and warned on every run."""
        if batch_size is None:
            batch_size = getattr(self, "_current_batch_size", None)
        super().log(name, value, *args, batch_size=batch_size, **kwargs)  # type: ignore[misc]

    def _note_batch_size(self, batch: Any) -> None:
        """Images in ``batch``: the leading dimension of its first tensor (a (B, ...) tensor, or the image entry of
        a dict batch, which also holds labels and file names)."""
        values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
        self._current_batch_size = next((int(v.shape[0]) for v in values if isinstance(v, Tensor) and v.dim() > 0),
                                        None)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._note_batch_size(batch)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._note_batch_size(batch)

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
        """Add ``codebook_usage`` (:func:`usage_figure` of the histogram counted so far in this split) to an
        image-log dict."""
        lo, hi = self.usage_picture_range
        in_validation = getattr(self, "_train_code_stats", None) is not None  # set while a validation run counts
        split, over = ("val", "this validation run so far") if in_validation else ("train", "this training epoch so far")
        step = int(getattr(self, "global_step", 0))
        pic = usage_figure(self.code_stats.code_counts, f"Codebook usage, {split}, step {step}", over)
        log["codebook_usage"] = (pic * (hi - lo) + lo).to(self.device)
        return log
