#!/usr/bin/env python
"""Across-seed summary of a ``reproduce.sh --seeds`` run: per-seed values, mean +- std, a verdict per metric, bands.

  python scripts/seed_summary.py OUT --out REPORT [--command "..."] [--wall-seconds N]

OUT holds ``seed_<S>/results/<row>.json`` (scripts/evaluate.py records). Rows are compared with the STE row of the
same codebase (``vqgan_ste``, ``vit_ste``). A verdict says "rotation better" / "rotation worse" only when every seed
agrees in sign (paired by seed); otherwise "no clear difference" (with a paired t statistic for reference). With
three seeds, all-agree is a sign test at p = 0.25 one-sided: weak evidence, stated as such in the report.

Writes REPORT/seeds.md, REPORT/seeds.json and REPORT/training_seeds_{vqgan,vit}.png (training usage and
quantization error against step: mean over seeds, band = min..max over seeds).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# metric key -> (column title, True if higher is better, format)
METRICS: dict[str, tuple[str, bool, str]] = {
    "codebook_usage_per_batch": ("usage / batch", True, "pct"),
    "codebook_usage_whole_set": ("usage / set", True, "pct"),
    "dead_codes": ("dead codes (set)", False, "int"),
    "quant_error": ("quant. error / vector", False, "sci"),
    "quant_error_per_dim": ("quant. error / element", False, "sci"),
    "valid_loss": ("valid loss", False, "f4"),
    "psnr": ("PSNR (dB)", True, "f2"),
    "ssim": ("SSIM", True, "f3"),
}
FAMILIES = {"vqgan": "Table 3 regime: VQGAN, 8192 codes x 3", "vit": "Table 4 regime: ViT-VQGAN, 8192 codes x 32"}


def metrics_of(rec: Mapping[str, Any]) -> dict[str, Optional[float]]:
    """The summarised metrics of one record (dead codes and the per-element error derived where absent)."""
    m = dict(rec.get("metrics", {}))
    model = rec.get("model", {})
    n, d = model.get("n_embed"), model.get("embed_dim")
    if m.get("used_codes_whole_set") is not None and n:
        m["dead_codes"] = float(n - m["used_codes_whole_set"])
    if m.get("quant_error_per_dim") is None and m.get("quant_error") is not None and d:
        m["quant_error_per_dim"] = m["quant_error"] / d
    return {k: (None if m.get(k) is None else float(m[k])) for k in METRICS}


def fmt(v: Optional[float], kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return {"pct": f"{100 * v:.2f}%", "int": f"{v:.0f}", "sci": f"{v:.2e}", "f4": f"{v:.4f}", "f2": f"{v:.2f}",
            "f3": f"{v:.3f}"}[kind]


def mean_std(vals: Sequence[float]) -> tuple[float, float]:
    n = len(vals)
    mu = sum(vals) / n
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (n - 1)) if n > 1 else float("nan")
    return mu, sd


def verdict(diffs: Sequence[float], higher_better: bool) -> tuple[str, str]:
    """(verdict, basis) for paired differences rotation - STE over seeds."""
    if len(diffs) < 2:
        return "no clear difference", f"only {len(diffs)} seed"
    better = [(d > 0) if higher_better else (d < 0) for d in diffs]
    worse = [(d < 0) if higher_better else (d > 0) for d in diffs]
    mu, sd = mean_std(diffs)
    t = mu / (sd / math.sqrt(len(diffs))) if sd and sd > 0 else float("inf") if mu else 0.0
    basis_t = f"paired t = {t:.2f}, {len(diffs) - 1} dof"
    if all(better):
        return "rotation better", f"all {len(diffs)} seeds agree ({basis_t})"
    if all(worse):
        return "rotation worse", f"all {len(diffs)} seeds agree ({basis_t})"
    return "no clear difference", f"seeds disagree: {sum(better)} better, {sum(worse)} worse ({basis_t})"


def collect(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """row -> seed -> record (with ``_path``)."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for seed_dir in sorted(out.glob("seed_*")):
        try:
            seed = int(seed_dir.name.split("_", 1)[1])
        except ValueError:
            continue
        for f in sorted((seed_dir / "results").glob("*.json")):
            rec = json.loads(f.read_text())
            rec["_path"] = str(f)
            rows.setdefault(f.stem, {})[seed] = rec
    return rows


def training_series(rec: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    from make_tables import find_log_dir, pick_series, read_scalars

    d = find_log_dir(rec)
    if d is None:
        return {}
    s = read_scalars(d)
    out = {}
    for name in ("codebook_usage", "quant_error"):
        pts = pick_series(s, name)
        if pts:
            out[name] = pts
    return out


def plot_bands(rows: Mapping[str, Mapping[int, Mapping[str, Any]]], family: str, path: Path) -> bool:
    """Training usage and quantization error vs step: mean over seeds, band min..max, one colour per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from make_tables import finish_curves

    names = [r for r in rows if r.startswith(family + "_")]
    if not names:
        return False
    colours = {"ste": "tab:blue", "rot": "tab:red", "rot_paper": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    drawn = False
    for row in sorted(names):
        kind = row[len(family) + 1:]
        per_seed = [training_series(rec) for rec in rows[row].values()]
        for ax, name in zip(axes, ("codebook_usage", "quant_error")):
            curves = [dict(s[name]) for s in per_seed if name in s]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            v = np.array([[c[t] for t in steps] for c in curves])
            ax.fill_between(steps, v.min(0), v.max(0), color=colours.get(kind), alpha=0.2)
            ax.plot(steps, v.mean(0), color=colours.get(kind), label=f"{row} ({len(curves)} seeds)")
            drawn = True
    return finish_curves(fig, axes, drawn, f"{FAMILIES[family]}: mean over seeds, band = min..max", path)


def summarise(out: Path, report: Path, command: Optional[str] = None, wall_seconds: Optional[float] = None,
              plots: bool = True) -> dict[str, Any]:
    rows = collect(out)
    report.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"command": command, "wall_seconds": wall_seconds, "rows": {}, "comparisons": []}
    lines = ["# Across-seed summary", ""]
    if command:
        lines += [f"Command: `{command}`" + (f" ({wall_seconds / 60:.1f} min wall)" if wall_seconds else ""), ""]
    for family, title in FAMILIES.items():
        fam_rows = sorted(r for r in rows if r.startswith(family + "_"))
        if not fam_rows:
            continue
        lines += [f"## {title}", "", "| row | seed | step | " + " | ".join(t for t, _, _ in METRICS.values()) + " |",
                  "|---|---|---|" + "---|" * len(METRICS)]
        for row in fam_rows:
            per = {s: metrics_of(r) for s, r in sorted(rows[row].items())}
            summary["rows"][row] = {"per_seed": per, "steps": {s: r.get("checkpoint", {}).get("global_step")
                                                             for s, r in rows[row].items()}}
            for s, m in per.items():
                step = rows[row][s].get("checkpoint", {}).get("global_step")
                lines.append(f"| {row} | {s} | {step} | " + " | ".join(fmt(m[k], kind) for k, (_, _, kind)
                                                                       in METRICS.items()) + " |")
            ms = {}
            for k, (_, _, kind) in METRICS.items():
                vals = [m[k] for m in per.values() if m[k] is not None]
                ms[k] = mean_std(vals) if vals else None
            summary["rows"][row]["mean_std"] = ms
            lines.append(f"| **{row}** | mean ± std | | " + " | ".join(
                "-" if ms[k] is None else f"{fmt(ms[k][0], kind)} ± {fmt(ms[k][1], kind)}"
                for k, (_, _, kind) in METRICS.items()) + " |")
        lines.append("")
        base = f"{family}_ste"
        for row in fam_rows:
            if row == base or base not in rows:
                continue
            seeds = sorted(set(rows[row]) & set(rows[base]))
            lines += [f"**{row} vs {base}** (paired by seed; seeds {', '.join(map(str, seeds))}):", "",
                      "| metric | rotation - STE per seed | verdict | basis |", "|---|---|---|---|"]
            for k, (title, hb, kind) in METRICS.items():
                a = [metrics_of(rows[row][s])[k] for s in seeds]
                b = [metrics_of(rows[base][s])[k] for s in seeds]
                if any(v is None for v in a + b):
                    continue
                diffs = [x - y for x, y in zip(a, b)]
                v, basis = verdict(diffs, hb)
                summary["comparisons"].append({"row": row, "baseline": base, "metric": k, "diffs": diffs,
                                               "verdict": v, "basis": basis})
                dk = "sci" if kind in ("sci",) else kind
                lines.append(f"| {title} | {', '.join(fmt(d, dk) for d in diffs)} | {v} | {basis} |")
            lines.append("")
        if plots and plot_bands(rows, family, report / f"training_seeds_{family}.png"):
            lines += [f"![training curves]({f'training_seeds_{family}.png'})", ""]
    lines += ["Verdicts: 'better'/'worse' only when every seed agrees in sign; with 3 seeds that is a sign test at "
              "p = 0.25 (one-sided), weak evidence on its own.", ""]
    (report / "seeds.md").write_text("\n".join(lines))
    (report / "seeds.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n".join(lines))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="reproduce.sh --out folder holding seed_<S>/results/*.json")
    p.add_argument("--out", dest="report", required=True, help="report folder")
    p.add_argument("--command", default=None)
    p.add_argument("--wall-seconds", type=float, default=None)
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    return summarise(Path(a.out), Path(a.report), a.command, a.wall_seconds, not a.no_plots)


if __name__ == "__main__":
    main()
