"""The verdict rule of every table the across-seed summaries make (issue 24 item 5), in one place.

Paired by seed, the mean difference row - baseline with its two-sided 95% Student-t interval over seeds (n - 1
degrees of freedom); "better" / "worse" only when the interval excludes 0, over at least ``MIN_SEEDS`` seeds; the
sign count is kept beside it. ``RULE`` states it in the words the reports print. Also the number formats the tables
share.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

# A verdict needs at least this many seeds (its interval has n - 1 degrees of freedom).
MIN_SEEDS = 3
# Two-sided 95% quantiles of Student's t, t_{0.975, dof}, dof = 1..30 (tested against scipy.stats.t.ppf); beyond 30
# the dof-30 value, which is conservative (larger than every later quantile).
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
        2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
        2.0518, 2.0484, 2.0452, 2.0423)
RULE = ("'better'/'worse' (for the first row of the pair) only when the 95% Student-t interval of the mean paired "
        "difference over seeds (n - 1 degrees of freedom) excludes 0, over at least 3 seeds ('too few seeds' below "
        "that); else 'no clear difference'. The sign count (seeds in which the first row is better) is the second "
        "column: all n seeds agreeing is a two-sided sign test at p = 2 x 0.5^n (0.25 for 3 seeds, 0.0625 for 5, "
        "0.002 for 10). Several metrics and pairs are tested at once, with no multiplicity correction: at 5% each, "
        "about one verdict in twenty among true null effects is expected to be spurious.")

def fmt(v: Optional[float], kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return {"pct": f"{100 * v:.2f}%", "int": f"{v:.0f}", "sci": f"{v:.2e}", "f4": f"{v:.4f}", "f2": f"{v:.2f}",
            "f3": f"{v:.3f}", "f1": f"{v:.1f}"}[kind]


def mean_std(vals: Sequence[float]) -> tuple[float, float]:
    n = len(vals)
    mu = sum(vals) / n
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (n - 1)) if n > 1 else float("nan")
    return mu, sd


def t_interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``diffs`` and its two-sided 95% Student-t interval (n - 1 dof; n >= 2)."""
    n = len(diffs)
    mu, sd = mean_std(diffs)
    half = T975[min(n - 1, len(T975)) - 1] * sd / math.sqrt(n)
    return mu, mu - half, mu + half


def verdict(diffs: Sequence[float], higher_better: bool) -> dict[str, Any]:
    """The verdict rule (``RULE``) for paired differences row - baseline over seeds, in one place for every table.

    Returns ``verdict`` (better / worse / no clear difference / too few seeds, for the row), ``mean``, ``ci``
    ([low, high], the 95% t interval; None below 2 seeds), ``signs`` ("k/n": seeds where the row is better) and
    ``basis`` (one line saying why)."""
    n = len(diffs)
    better = sum((d > 0) if higher_better else (d < 0) for d in diffs)
    out: dict[str, Any] = {"mean": sum(diffs) / n if n else None, "ci": None, "signs": f"{better}/{n}"}
    if n >= 2:
        mu, lo, hi = t_interval(diffs)
        out["ci"] = [lo, hi]
    if n < MIN_SEEDS:
        out.update(verdict="too few seeds", basis=f"{n} of the {MIN_SEEDS} seeds a verdict needs")
        return out
    lo, hi = out["ci"]
    if lo > 0 or hi < 0:
        side = "above" if lo > 0 else "below"
        v = "better" if (lo > 0) == higher_better else "worse"
        out.update(verdict=v, basis=f"95% t interval {side} 0 ({n} seeds, {n - 1} dof)")
    else:
        out.update(verdict="no clear difference", basis=f"95% t interval includes 0 ({n} seeds, {n - 1} dof)")
    return out


def interval_text(m: Mapping[str, Any], kind: str, diff: Any = None) -> str:
    """``mean [low, high]`` of a verdict (``diff`` formats a difference; default ``fmt``)."""
    f = diff or (lambda v: fmt(v, kind))
    if m.get("mean") is None:
        return "-"
    return f(m["mean"]) + (f" [{f(m['ci'][0])}, {f(m['ci'][1])}]" if m.get("ci") else "")
