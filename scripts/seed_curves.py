"""Training curves of the across-seed summaries: read from a record or its run folder, binned, kept in the record,
and read at horizons (scripts/seed_summary.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from adapters.evaluation.records import dumps_record
from seed_rule import fmt, mean_std

# The training curves kept per row: logged every few steps, stored and drawn as means over bins of CURVE_BIN steps.
CURVES = ("codebook_usage", "quant_error")
CURVE_BIN = 50


def bin_means(points: Sequence[tuple[int, float]], every: int = CURVE_BIN) -> list[tuple[int, float]]:
    """The mean of the logged values in each bin (t - every, t], labelled t (a multiple of ``every``).

    Per-batch values are noisy, and a run logs at steps such as 9, 19, ..., 1999: keeping only the points at
    multiples of ``every`` kept almost nothing. Bin means are what the figures and the horizon table read, whether
    the curve came from a run folder or from a record that stored it."""
    bins: dict[int, list[float]] = {}
    for s, v in points:
        bins.setdefault(-(-int(s) // every) * every, []).append(float(v))
    return [(t, sum(vs) / len(vs)) for t, vs in sorted(bins.items())]


def training_series(rec: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Training usage and quantization error of a record's run as 50-step bin means: the curves the record stored
    (``training_curves``, see :func:`embed_curves`) or, failing that, its run folder's logs; {} when neither is
    there (a run folder that was not kept)."""
    stored = rec.get("training_curves")
    if stored:
        return {name: [(int(t), float(v)) for t, v in zip(*stored[name])] for name in CURVES if name in stored}
    from run_logs import find_log_dir, pick_series, read_scalars

    d = find_log_dir(rec)
    if d is None:
        return {}
    s = read_scalars(d)
    out = {}
    for name in CURVES:
        pts = pick_series(s, name)
        if pts:
            out[name] = bin_means(pts)
    return out


def curve_points(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The stored form of :func:`training_series`: ``{"every": 50, name: [[step, ...], [mean, ...]]}``, {} if none."""
    series = training_series(rec)
    if not series:
        return {}
    out: dict[str, Any] = {"every": CURVE_BIN}
    for name, pts in series.items():
        out[name] = [[float(t) for t, _ in pts], [v for _, v in pts]]
    return out


def embed_curves(rows: Mapping[str, Mapping[int, dict[str, Any]]]) -> list[str]:
    """Write each record's training curves into the record file (key ``training_curves``) when its run folder is
    still there and the record has none yet, so that the figures and the horizon table can be redrawn after the run
    folders are gone. Returns the paths written."""
    written = []
    for per in rows.values():
        for rec in per.values():
            if rec.get("training_curves"):
                continue
            curves = curve_points(rec)
            if not curves:
                continue
            rec["training_curves"] = curves
            path = Path(rec["_path"])
            path.write_text(dumps_record({k: v for k, v in rec.items() if k != "_path"}))
            written.append(str(path))
    return written


def window_mean(points: Sequence[tuple[int, float]], step: int, window: int = 50) -> Optional[float]:
    """Mean of a logged training series over (step - window, step]: per-batch values are noisy, a window is not."""
    vals = [v for s, v in points if step - window < s <= step]
    return sum(vals) / len(vals) if vals else None


def horizon_lines(rows: Mapping[str, Mapping[int, Mapping[str, Any]]], names: Sequence[str],
                  horizons: Sequence[int]) -> tuple[list[str], dict[str, Any]]:
    """Training usage per batch and quantization error at each horizon (mean of the 50 logged steps up to it),
    mean ± std over the seeds whose curves are there: how the picture changes with training length, for every row."""
    table: dict[str, Any] = {}
    lines = ["Training curves at each horizon (mean over the 50 steps up to it; mean ± std over the seeds whose "
             "curves were kept):", "",
             "| row | seeds | " + " | ".join(f"usage / batch @{h} | quant. error @{h}" for h in horizons) + " |",
             "|---|---|" + "---|---|" * len(horizons)]
    for row in names:
        by_seed = {seed: training_series(r) for seed, r in sorted(rows[row].items())}
        series = [s for s in by_seed.values() if s]
        cells, entry = [], {"seeds": [seed for seed, s in by_seed.items() if s]}
        for h in horizons:
            for name, kind in (("codebook_usage", "pct"), ("quant_error", "sci")):
                vals = [v for v in (window_mean(s[name], h) for s in series if name in s) if v is not None]
                entry[f"{name}@{h}"] = mean_std(vals) if vals else None
                cells.append("-" if not vals else f"{fmt(mean_std(vals)[0], kind)} ± {fmt(mean_std(vals)[1], kind)}")
        table[row] = entry
        lines.append(f"| {row} | {', '.join(map(str, entry['seeds'])) or '-'} | " + " | ".join(cells) + " |")
    return lines + [""], table
