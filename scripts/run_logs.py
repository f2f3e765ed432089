"""A run's label and its training logs: what the report scripts (make_tables.py, seed_summary.py) read beside an
evaluation record.

  run_label(rec)            the row's label ("VQGAN w/ rotation trick", "rotation (8,8,3)")
  find_log_dir(rec)         the run folder next to the record's checkpoint that holds scalar logs, or None
  read_scalars(folder)      every scalar series in it (Lightning CSV and TensorBoard): {tag: [(step, value)]}
  pick_series / last_value  one metric's per-step series / last value out of those
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


def run_label(rec: Mapping[str, Any]) -> str:
    row = rec.get("row", {})
    if row.get("label"):
        return str(row["label"])
    m = rec.get("model", {})
    return f"{m.get('gradient')} {m.get('latent_shape')}"


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series under a run folder: Lightning CSV ``metrics.csv`` files and TensorBoard event files."""
    series: dict[str, dict[int, float]] = {}
    for csv_path in sorted(log_dir.rglob("metrics.csv")):
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if step in (None, ""):
                    continue
                for k, v in row.items():
                    if k in ("step", "epoch") or v in (None, ""):
                        continue
                    try:
                        series.setdefault(k, {})[int(float(step))] = float(v)
                    except ValueError:
                        continue
    events = sorted(log_dir.rglob("events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for ev in events:
            acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                for e in acc.Scalars(tag):
                    series.setdefault(tag, {})[int(e.step)] = float(e.value)
    return {k: sorted(v.items()) for k, v in series.items()}


def find_log_dir(rec: Mapping[str, Any]) -> Optional[Path]:
    """The training run folder of a record: the checkpoint's folder or the one above it (latent-diffusion's
    ``<run>/checkpoints/``, enhancing-transformers' ``<run>/ckpt/``), when it holds scalar logs; else None.

    Never higher: once a run folder is deleted, a folder above it holds other runs' logs (the other estimator's row,
    a rerun), and a record must not borrow their curves."""
    ckpt = (rec.get("checkpoint") or {}).get("path")
    if rec.get("row", {}).get("log_dir"):
        d = Path(rec["row"]["log_dir"])  # relative: to the record's folder
        return d if d.is_absolute() or "_path" not in rec else Path(rec["_path"]).parent / d
    if not ckpt:
        return None
    for p in (Path(ckpt).parent, Path(ckpt).parent.parent):
        if p.is_dir() and (any(p.rglob("metrics.csv")) or any(p.rglob("events.out.tfevents.*"))):
            return p
    return None


def pick_series(series: Mapping[str, list[tuple[int, float]]], name: str, split: str = "train"
                ) -> Optional[list[tuple[int, float]]]:
    """Per-step series of ``{split}/{name}`` (Lightning's ``_step`` variant first, then the plain key)."""
    for key in (f"{split}/{name}_step", f"{split}/{name}", f"{split}/{name}_epoch"):
        if key in series and series[key]:
            return series[key]
    return None


def last_value(series: Mapping[str, list[tuple[int, float]]], keys: Sequence[str]) -> Optional[float]:
    for k in keys:
        if k in series and series[k]:
            return series[k][-1][1]
    return None
