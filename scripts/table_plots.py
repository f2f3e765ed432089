"""make_tables.py's figures: sorted code counts on the evaluation set, and training usage and quantization error
against step (one line per run); :func:`finish_curves` labels and saves any (usage, quantization error) pair of
panels, seed_plots.py's too."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from run_logs import pick_series, run_label

COLOURS = {"ste": "tab:blue", "rotation": "tab:red", "gumbel": "tab:green"}


def plot_usage(records: Sequence[Mapping[str, Any]], table: int, path: Path) -> bool:
    """Sorted code counts (most used first) per model on the evaluation set; x = rank / codebook size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recs = [r for r in records if r["row"]["table"] == table and r.get("code_counts")]
    if not recs:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in recs:
        counts = np.sort(np.asarray(r["code_counts"], dtype=float))[::-1]
        frac = counts / max(counts.sum(), 1.0)
        x = np.arange(1, len(counts) + 1) / len(counts)
        ax.plot(x, np.where(frac > 0, frac, np.nan), color=COLOURS.get(r["row"]["approach"]),
                label=f"{run_label(r)} ({100 * r['metrics']['codebook_usage_whole_set']:.1f}% used)")
    ax.set_yscale("log")
    ax.set_xlabel("code rank / codebook size")
    ax.set_ylabel("share of latent vectors")
    ax.set_title(f"Table {table}: sorted code counts on the evaluation set")
    ax.legend(fontsize=8)
    return save_figure(fig, None, path)


def plot_training(records: Sequence[Mapping[str, Any]], logs: Mapping[str, Mapping[str, list]], table: int,
                  path: Path) -> bool:
    """Training codebook usage and quantization error against step, one line per run (STE vs rotation vs Gumbel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recs = [r for r in records if r["row"]["table"] == table and r.get("_path") in logs]
    if not recs:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    drawn = False
    for r in recs:
        s = logs[r["_path"]]
        for ax, name in zip(axes, ("codebook_usage", "quant_error")):
            pts = pick_series(s, name)
            if pts:
                steps, vals = [p[0] for p in pts], [p[1] for p in pts]
                colour = COLOURS.get(r["row"]["approach"])
                # Per-step values are noisy: raw faintly, a centred moving average (1/20 of the run) on top.
                k = max(1, len(vals) // 20)
                smooth = np.convolve(np.pad(vals, (k // 2, k - 1 - k // 2), mode="edge"), np.ones(k) / k, "valid")
                ax.plot(steps, vals, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(steps, smooth, color=colour, label=run_label(r))
                drawn = True
    return finish_curves(fig, axes, drawn, f"Table {table}: training curves, STE vs rotation", path)


def finish_curves(fig: Any, axes: Sequence[Any], drawn: bool, title: str, path: Path) -> bool:
    """Label the (usage, quantization error) against step panels and save them to ``path``; False if empty."""
    import matplotlib.pyplot as plt

    if not drawn:
        plt.close(fig)
        return False
    axes[0].set_ylabel("train codebook usage (fraction per batch)")
    axes[1].set_ylabel("train quantization error ||e - q||^2")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return save_figure(fig, title, path)


def save_figure(fig: Any, title: str | None, path: Path) -> bool:
    """Title (a figure-wide one, if given), lay out, write ``path`` at 120 dpi and close: every report figure's end."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
