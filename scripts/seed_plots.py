"""Figures of the across-seed summary (scripts/seed_summary.py computes, this draws).

Rows are ``[label/]family_estimator``; ``kinds`` maps each row to its estimator suffix (``ste``, ``rot``,
``rot_paper``), which picks the colour; the label (e.g. the init) picks the line style.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

COLOURS = {"ste": "tab:blue", "rot": "tab:red", "rot_paper": "tab:green", "rot_stage": "tab:purple"}
# one line style per label (five remedies in the remedies study: a fifth style, not a repeat of the first)
STYLES = ("-", "--", ":", "-.", (0, (6, 1, 1, 1, 1, 1)))


def _styles(rows: Sequence[str]) -> dict[str, object]:
    labels = sorted({r.split("/")[0] for r in rows if "/" in r})
    return {r: dict(zip(labels, STYLES)).get(r.split("/")[0], "-") if "/" in r else "-" for r in rows}


def plot_bands(curves: Mapping[str, Sequence[Mapping[str, Sequence[tuple[int, float]]]]], kinds: Mapping[str, str],
               names: Sequence[str], title: str, path: Path) -> bool:
    """One panel per series name (usage, quantization error): for each row the mean over its seeds (line) and the
    min..max band, over the steps every seed has. ``curves[row]`` holds one ``{name: [(step, value)]}`` per seed
    (empty when a seed's curves were not kept). False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from table_plots import finish_curves

    style = _styles(list(curves))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.0))
    drawn = False
    for row in sorted(curves):
        for ax, name in zip(axes, names):
            per_seed = [dict(s[name]) for s in curves[row] if name in s]
            steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
            if not steps:
                continue
            v = np.array([[c[t] for t in steps] for c in per_seed])
            ax.fill_between(steps, v.min(0), v.max(0), color=COLOURS.get(kinds[row]), alpha=0.2)
            ax.plot(steps, v.mean(0), linestyle=style[row], color=COLOURS.get(kinds[row]),
                    label=f"{row} ({len(per_seed)} seeds)")
            drawn = True
    return finish_curves(fig, axes, drawn, title, path)


def plot_code_counts(counts: Mapping[str, Sequence[Sequence[int]]], kinds: Mapping[str, str], title: str,
                     path: Path) -> bool:
    """Rank-frequency of the codebook over the evaluation images: each seed's per-code counts sorted in decreasing
    order (log-log), one thin line per seed. A collapsed codebook is a short steep line; a well-used one is long and
    flat. ``counts[row]`` holds one list of per-code counts per seed. False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from table_plots import save_figure

    style = _styles(list(counts))
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    drawn = False
    for row in sorted(counts):
        for i, c in enumerate(counts[row]):
            used = np.sort(np.asarray(c, dtype=float))[::-1]
            used = used[used > 0]
            if used.size == 0:
                continue
            label = f"{row} ({len(counts[row])} seeds, {len(c)} codes)" if i == 0 else None
            ax.plot(np.arange(1, used.size + 1), used, linestyle=style[row], color=COLOURS.get(kinds[row]), alpha=0.7,
                    linewidth=1.0, label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("code rank (codes sorted by use; the line ends at the number of codes used)")
    ax.set_ylabel("latent vectors quantized to the code")
    ax.legend(fontsize=8)
    return save_figure(fig, title, path)
