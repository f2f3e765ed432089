#!/usr/bin/env python
"""Tables 3 and 4 of the rotation-trick paper beside our evaluation records, plus plots.

  python scripts/make_tables.py results/ --out report/ [--no-plots] [--command "..."] [--overwrite]

Inputs: evaluation JSONs written by scripts/evaluate.py (files or folders). Each record names its paper row
(``row``: table 3/4, approach ste/gumbel/rotation, latent setting); rows of ours whose setting the paper does not
have (tiny runs) are still listed, beside the paper row of the same approach named by ``--setting`` at evaluation.

Outputs in --out:
  table3.md / table3.csv, table4.md / table4.csv   paper | ours | ours - paper, per row
  direction.md / direction.json                    does rotation beat STE (and Gumbel) in ours as in the paper?
  report.md                                        all of it on one page (with --command, how it was made)
  codebook_usage_table{3,4}.png                    sorted code counts per model (evaluation set)
  training_table{3,4}.png                          codebook usage and quantization error against step, from the
                                                   training logs next to each checkpoint (Lightning CSV/TensorBoard)
  make_tables.json                                 which records the report was made from (checked on the next run)

A folder that already holds a report not made from these records (a committed one under docs/report/) is refused:
pass --overwrite to replace it (its old tables and plots are removed first, so no old file is left beside the new
ones).
Files make_tables does not write (README.md, results/) are never touched.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, also when loaded by file path

from run_logs import find_log_dir, last_value, pick_series, read_scalars, run_label  # noqa: E402,F401
from table_plots import COLOURS, finish_curves, plot_training, plot_usage  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------------------------
# The paper's numbers (ICLR 2025 version; ../shared/reference/paper_tables.md). Fractions, not percentages.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperRow:
    table: int
    approach: str  # "ste" | "gumbel" | "rotation" | "reported" (ViT-VQGAN's own authors)
    name: str
    setting: str  # latent shape HxWxC
    codebook_size: int
    usage: Optional[float]
    quant_error: Optional[float]
    valid_loss: Optional[float]
    r_fid: Optional[float]
    r_is: Optional[float]
    train_loss: Optional[float] = None


PAPER: tuple[PaperRow, ...] = (
    PaperRow(3, "ste", "VQGAN", "64x64x3", 8192, 0.15, 2.5e-3, 0.183, 0.53, 220.6),
    PaperRow(3, "gumbel", "Gumbel VQGAN", "64x64x3", 8192, 0.04, None, 0.197, 0.60, 219.7),
    PaperRow(3, "rotation", "VQGAN w/ rotation trick", "64x64x3", 8192, 0.86, 1.7e-4, 0.142, 0.27, 228.0),
    PaperRow(3, "ste", "VQGAN", "32x32x4", 16384, 0.02, 1.2e-2, 0.385, 5.0, 141.5),
    PaperRow(3, "gumbel", "Gumbel VQGAN", "32x32x4", 16384, 0.12, None, 0.3031, 1.7, 189.5),
    PaperRow(3, "rotation", "VQGAN w/ rotation trick", "32x32x4", 16384, 0.27, 2.4e-4, 0.269, 1.1, 200.2),
    PaperRow(4, "reported", "ViT-VQGAN (reported by its authors)", "32x32x32", 8192, None, None, None, 22.8, 72.9),
    PaperRow(4, "ste", "ViT-VQGAN (the paper's run)", "32x32x32", 8192, 0.003, 6.7e-3, 0.127, 29.2, 43.0, 0.124),
    PaperRow(4, "rotation", "ViT-VQGAN w/ rotation trick", "32x32x32", 8192, 0.022, 8.3e-3, 0.113, 11.2, 93.1, 0.113),
)
NAMES = {3: {"ste": "VQGAN", "gumbel": "Gumbel VQGAN", "rotation": "VQGAN w/ rotation trick"},
         4: {"ste": "ViT-VQGAN", "gumbel": "ViT-VQGAN (Gumbel)", "rotation": "ViT-VQGAN w/ rotation trick"}}

# Column: (key in our metrics, header, better direction (+1 higher, -1 lower, 0 none), paper field or None)
COLUMNS: tuple[tuple[str, str, int, Optional[str]], ...] = (
    ("codebook_usage_per_batch", "Usage (per batch)", +1, "usage"),
    ("codebook_usage_whole_set", "Usage (whole set)", +1, None),
    ("quant_error", "Quant. error", -1, "quant_error"),
    ("train_loss", "Train loss", -1, "train_loss"),
    ("valid_loss", "Valid loss", -1, "valid_loss"),
    ("r_fid", "r-FID", -1, "r_fid"),
    ("r_is", "r-IS", +1, "r_is"),
    ("psnr", "PSNR", +1, None),
    ("ssim", "SSIM", +1, None),
    ("lpips", "LPIPS", -1, None),
)
PERCENT = {"codebook_usage_per_batch", "codebook_usage_whole_set"}


def paper_row(table: int, approach: str, setting: Optional[str]) -> Optional[PaperRow]:
    """The paper's row for (table, approach, setting); Table 4 has one setting, so setting is ignored there."""
    for r in PAPER:
        if r.table == table and r.approach == approach and (table == 4 or r.setting == setting):
            return r
    return None


# ---------------------------------------------------------------------------------------------------------------
# Records and training logs
# ---------------------------------------------------------------------------------------------------------------
def load_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    from adapters.evaluation import load_records as _load

    records = _load(paths)
    if not records:
        raise SystemExit(f"make_tables: no evaluation records (schema rotation-trick-eval/1) in {list(map(str, paths))}; "
                         f"write some with scripts/evaluate.py --out")
    return records


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TableRow:
    table: int
    approach: str
    name: str
    setting: str
    codebook_size: Optional[int]
    source: str  # "paper" | "ours" | "ours - paper"
    label: str
    images: Optional[int]
    values: dict[str, Optional[float]]


def build_rows(records: Sequence[Mapping[str, Any]], table: int,
               logs: Optional[Mapping[str, Mapping[str, list[tuple[int, float]]]]] = None) -> list[TableRow]:
    """Paper rows in paper order, each followed by our runs for it and their differences; then unmatched runs."""
    logs = logs or {}
    ours = [r for r in records if r["row"]["table"] == table]
    used: set[int] = set()
    rows: list[TableRow] = []

    def our_row(rec: Mapping[str, Any]) -> TableRow:
        vals = {k: rec["metrics"].get(k) for k, *_ in COLUMNS}
        vals["train_loss"] = rec.get("train_loss")
        if vals["train_loss"] is None and rec.get("_path") in logs:
            vals["train_loss"] = last_value(logs[rec["_path"]], ["train/rec_loss_epoch", "train/rec_loss"])
        m = rec["model"]
        return TableRow(table, rec["row"]["approach"], NAMES[table].get(rec["row"]["approach"], rec["row"]["approach"]),
                        str(m.get("latent_shape")), m.get("n_embed"), "ours", run_label(rec),
                        rec["data"]["num_images"], vals)

    for p in (r for r in PAPER if r.table == table):
        pvals = {k: (getattr(p, f) if f else None) for k, _, _, f in COLUMNS}
        rows.append(TableRow(table, p.approach, p.name, p.setting, p.codebook_size, "paper", "paper", 50000, pvals))
        for i, rec in enumerate(ours):
            row = rec["row"]
            if i in used or row["approach"] != p.approach or (table == 3 and row.get("setting") != p.setting):
                continue
            used.add(i)
            mine = our_row(rec)
            rows.append(mine)
            diff = {k: (None if mine.values[k] is None or pvals[k] is None else mine.values[k] - pvals[k])
                    for k in pvals}
            rows.append(TableRow(table, p.approach, p.name, p.setting, None, "ours - paper", mine.label, None, diff))
    for i, rec in enumerate(ours):
        if i not in used:
            rows.append(our_row(rec))
    return rows


def fmt(key: str, v: Optional[float], diff: bool = False, paper: bool = False) -> str:
    """One cell. ``paper`` cells are quoted as the paper prints them (no rounding, no padding)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if paper:
        if key in PERCENT:
            return f"{100 * v:g}%"
        return f"{v:.1e}" if key == "quant_error" else f"{v:g}"
    sign = "+" if diff and v >= 0 else ""
    if key in PERCENT:
        return f"{sign}{100 * v:.1f}{' pp' if diff else '%'}"
    if key == "quant_error":
        return f"{sign}{v:.2e}"
    if abs(v) >= 100:
        return f"{sign}{v:.1f}"
    return f"{sign}{v:.2f}" if abs(v) >= 1 else f"{sign}{v:.3f}"


def render_markdown(rows: Sequence[TableRow], table: int) -> str:
    title = {3: "Table 3: VQGAN (latent-diffusion)", 4: "Table 4: ViT-VQGAN (enhancing-transformers)"}[table]
    head = ["Approach", "Latent", "Codebook", "Source", "Images"] + [h for _, h, _, _ in COLUMNS]
    out = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        src = r.source if r.source != "ours" else f"ours: {r.label}"
        cells = [r.name if r.source != "ours - paper" else "", r.setting if r.source != "ours - paper" else "",
                 str(r.codebook_size or ""), src, str(r.images or "")]
        cells += [fmt(k, r.values.get(k), diff=r.source == "ours - paper", paper=r.source == "paper")
                  for k, _, _, _ in COLUMNS]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Usage (per batch) is the paper's definition (fraction of the codebook one batch uses, averaged over "
            "batches); Usage (whole set) counts codes used anywhere in the evaluated set. Paper rows use the 50,000 "
            "ImageNet validation images; ours say how many images they used. 'ours - paper' differences are in "
            "percentage points for usage.", ""]
    return "\n".join(out)


def render_csv(rows: Sequence[TableRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "approach", "name", "setting", "codebook_size", "source", "label", "images"]
               + [k for k, *_ in COLUMNS])
    for r in rows:
        w.writerow([r.table, r.approach, r.name, r.setting, r.codebook_size or "", r.source, r.label, r.images or ""]
                   + ["" if r.values.get(k) is None else repr(float(r.values[k])) for k, *_ in COLUMNS])
    return buf.getvalue()


def direction_summary(rows: Sequence[TableRow], table: int) -> list[dict[str, Any]]:
    """For each setting and metric: does rotation beat STE (and Gumbel) in the paper, and in ours?"""
    out = []
    settings = sorted({r.setting for r in rows if r.source == "ours"})
    for setting in settings:
        def ours_of(approach: str) -> Optional[TableRow]:
            return next((r for r in rows if r.source == "ours" and r.approach == approach and r.setting == setting),
                        None)

        rot = ours_of("rotation")
        if rot is None:
            continue
        for baseline in ("ste", "gumbel"):
            base = ours_of(baseline)
            if base is None:
                continue
            paper_setting = next((r.setting for r in rows if r.source == "ours - paper" and r.label == rot.label), None)
            p_rot = paper_row(table, "rotation", paper_setting or setting)
            p_base = paper_row(table, baseline, paper_setting or setting)
            for key, header, better, pfield in COLUMNS:
                if better == 0:
                    continue
                a, b = rot.values.get(key), base.values.get(key)
                ours_dir = None if a is None or b is None else ("better" if (a - b) * better > 0 else
                                                                 "worse" if (a - b) * better < 0 else "equal")
                pa = getattr(p_rot, pfield) if p_rot and pfield else None
                pb = getattr(p_base, pfield) if p_base and pfield else None
                paper_dir = None if pa is None or pb is None else ("better" if (pa - pb) * better > 0 else
                                                                    "worse" if (pa - pb) * better < 0 else "equal")
                if ours_dir is None and paper_dir is None:
                    continue
                out.append({"table": table, "setting": setting, "paper_setting": p_rot.setting if p_rot else None,
                            "baseline": baseline, "metric": header, "ours_rotation": a, "ours_baseline": b,
                            "ours": ours_dir, "paper": paper_dir,
                            "agrees": None if ours_dir is None or paper_dir is None else ours_dir == paper_dir,
                            "key": key})
    return out


def render_direction(items: Sequence[Mapping[str, Any]]) -> str:
    out = ["| Table | Our latent (paper's) | Rotation vs | Metric | Ours: rotation | Ours: baseline | Ours | Paper | "
           "Same direction? |", "|---|---|---|---|---|---|---|---|---|"]
    for it in items:
        agree = {True: "yes", False: "**no**", None: "n/a"}[it["agrees"]]
        out.append(f"| {it['table']} | {it['setting']} ({it['paper_setting'] or '-'}) | {it['baseline']} | "
                   f"{it['metric']} | {fmt(it['key'], it['ours_rotation'])} | {fmt(it['key'], it['ours_baseline'])} | "
                   f"{it['ours'] or '-'} | {it['paper'] or '-'} | {agree} |")
    return "\n".join(out) + "\n"


def render_report(records: Sequence[Mapping[str, Any]], tables_md: Sequence[str], directions: Sequence[Mapping],
                  written: Sequence[str], command: Optional[str]) -> str:
    """One Markdown page: how it was made, the runs, the tables, the direction summary and the plots."""
    lines = ["# Reproduction report: Tables 3 and 4 beside the paper", ""]
    if command:
        lines += ["Made with:", "", "```bash", command, "```", ""]
    lines += ["| Run | Table | Approach | Gradient | Latent | Images | Source | Checkpoint step | Eval seconds |",
              "|---|---|---|---|---|---|---|---|---|"]
    order = {"reported": 0, "ste": 1, "gumbel": 2, "rotation": 3}
    for r in sorted(records, key=lambda r: (r["row"]["table"], order.get(r["row"]["approach"], 9), run_label(r))):
        lines.append(f"| {run_label(r)} | {r['row']['table']} | {r['row']['approach']} | {r['model'].get('gradient')} "
                     f"| {r['model'].get('latent_shape')} | {r['data']['num_images']} | {r['data'].get('source')} | "
                     f"{r['checkpoint'].get('global_step')} | {r['environment'].get('seconds')} |")
    skipped = sorted({f"{k}: {v}" for r in records for k, v in (r.get("skipped") or {}).items()})
    if skipped:
        lines += ["", "Metrics not computed: " + "; ".join(skipped) + "."]
    lines += [""] + list(tables_md)
    lines += ["### Direction: rotation trick vs baselines, ours and the paper's", "", render_direction(directions)]
    agree = sum(1 for d in directions if d["agrees"] is True)
    disagree = [d for d in directions if d["agrees"] is False]
    lines += [f"Same direction as the paper in {agree} of {agree + len(disagree)} comparable cells"
              + (": differs for " + ", ".join(f"{d['metric']} (table {d['table']}, vs {d['baseline']})"
                                             for d in disagree) if disagree else "") + ".", ""]
    for png in (w for w in written if w.endswith(".png")):
        lines += [f"![{png}]({png})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
MANIFEST = "make_tables.json"
# every file make_tables may write: what --overwrite removes, and what marks a folder as holding a report
OUTPUT_FILES = tuple(f"{stem}{table}.{ext}" for table in (3, 4) for stem, ext in
                     (("table", "md"), ("table", "csv"), ("codebook_usage_table", "png"), ("training_table", "png"))
                     ) + ("direction.md", "direction.json", "report.md", MANIFEST)


def record_digests(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """sha256 of each record (its content less ``training_curves``), sorted: what identifies the records a report
    was made from."""
    # Of the parsed content, not the bytes: a record rewritten in the compact form (adapters.evaluation.records) is
    # the same record; and without its training curves, which seed_summary --embed-curves adds after the per-seed
    # reports were made from it (a rerun of a finished study must find the same records, issue 23 item 4).
    def content(r: Mapping[str, Any]) -> str:
        data = json.loads(Path(r["_path"]).read_text())
        data.pop("training_curves", None)
        return json.dumps(data, sort_keys=True)

    return sorted(hashlib.sha256(content(r).encode()).hexdigest() for r in records)


def prepare_out(out: Path, digests: list[str], overwrite: bool) -> None:
    """Make ``out`` ready for a report of the records with ``digests``: refuse (one line) a folder holding a report
    of other records unless ``overwrite``; remove the old report's files when replacing it."""
    present = [name for name in OUTPUT_FILES if (out / name).is_file()]
    if not present:
        return
    try:
        same = json.loads((out / MANIFEST).read_text()).get("records") == digests
    except (OSError, ValueError, AttributeError):
        same = False
    if not same and not overwrite:
        raise SystemExit(f"make_tables: {out} already holds a report ({', '.join(present[:3])}"
                         f"{', ...' if len(present) > 3 else ''}) not made from these records; write to a new --out "
                         "folder, or add --overwrite to replace that report")
    for name in present:  # the new report may have fewer tables or plots: leave none of the old ones behind
        (out / name).unlink()


def make_tables(inputs: Sequence[str | Path], out: str | Path, plots: bool = True,
                command: Optional[str] = None, overwrite: bool = False) -> dict[str, Any]:
    """Write tables, direction summary and plots; returns what was written and the direction items."""
    out = Path(out)
    records = load_records(inputs)
    digests = record_digests(records)
    prepare_out(out, digests, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    logs: dict[str, dict[str, list]] = {}
    for r in records:
        d = find_log_dir(r)
        if d is not None:
            s = read_scalars(d)
            if s:
                logs[r["_path"]] = s
                r["_log_dir"] = str(d)
    written: list[str] = []
    directions: list[dict[str, Any]] = []
    md_all = []
    for table in (3, 4):
        rows = build_rows(records, table, logs)
        if not any(r.source == "ours" for r in rows):
            continue
        md = render_markdown(rows, table)
        md_all.append(md)
        (out / f"table{table}.md").write_text(md)
        (out / f"table{table}.csv").write_text(render_csv(rows))
        written += [f"table{table}.md", f"table{table}.csv"]
        directions += direction_summary(rows, table)
        if plots:
            if plot_usage(records, table, out / f"codebook_usage_table{table}.png"):
                written.append(f"codebook_usage_table{table}.png")
            if plot_training(records, logs, table, out / f"training_table{table}.png"):
                written.append(f"training_table{table}.png")
    (out / "direction.md").write_text(render_direction(directions))
    (out / "report.md").write_text(render_report(records, md_all, directions, written, command))
    written.append("report.md")
    (out / "direction.json").write_text(json.dumps(directions, indent=1) + "\n")
    written += ["direction.md", "direction.json"]
    (out / MANIFEST).write_text(json.dumps({"records": digests, "paths": sorted(r["_path"] for r in records),
                                            "written": written}, indent=1) + "\n")
    return {"written": written, "directions": directions, "records": len(records), "logs": sorted(
        r.get("_log_dir", "") for r in records if r.get("_log_dir")), "markdown": "\n".join(md_all)}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="evaluation JSON files or folders holding them")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--command", default=None, help="the command that produced the records, quoted in report.md")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report of other records in --out (its tables and plots are removed first)")
    args = p.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    res = make_tables(args.inputs, args.out, plots=not args.no_plots, command=args.command, overwrite=args.overwrite)
    print(f"make_tables: {res['records']} records -> {args.out}: {', '.join(res['written'])}")
    return res


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        print(f"make_tables.py: error: {err}", file=sys.stderr)
        sys.exit(2)
