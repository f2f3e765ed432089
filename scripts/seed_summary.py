#!/usr/bin/env python
"""Across-seed summary of a ``reproduce.sh --seeds`` run: per-seed values, mean +- std, a verdict per metric, bands.

  python scripts/seed_summary.py OUT --out REPORT [--command "..."] [--wall-seconds N] [--embed-curves]
  python scripts/seed_summary.py LABEL=OUT LABEL=OUT ... --out REPORT --horizons 200,1000,2000

OUT holds ``seed_<S>/results/<row>.json`` (scripts/evaluate.py records). Rows are compared with the STE row of the
same codebase (``vqgan_ste``, ``vit_ste``). The verdict rule is ``seed_rule.verdict``, the one function every table
uses: paired by seed, the mean difference with its 95% Student-t interval over seeds (n - 1 degrees of freedom);
"better" / "worse" only when the interval excludes 0, over at least 3 seeds; the sign count is kept beside it.

Writes REPORT/seeds.md, REPORT/seeds.json and REPORT/training_seeds_{vqgan,vit}.png (training usage and
quantization error against step, 50-step means: mean over seeds, band = min..max over seeds). The curves come from
each record (``training_curves``, written by ``--embed-curves`` while the run folder is there) or its run folder.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from adapters import canonical_targets  # noqa: E402
from adapters.evaluation.records import dumps_record  # noqa: E402
from seed_curves import (CURVE_BIN, CURVES, curve_points, embed_curves, horizon_lines,  # noqa: E402,F401
                         training_series)
from seed_rule import MIN_SEEDS, RULE, T975, fmt, interval_text, mean_std, verdict  # noqa: E402,F401

# metric key -> (column title, True if higher is better, format)
METRICS: dict[str, tuple[str, bool, str]] = {
    "codebook_usage_per_batch": ("usage / batch", True, "pct"),
    "codebook_usage_whole_set": ("usage / set", True, "pct"),
    "perplexity_whole_set": ("perplexity (set)", True, "f1"),
    "dead_codes": ("dead codes (set)", False, "int"),
    "quant_error": ("quant. error / vector", False, "sci"),
    "quant_error_per_dim": ("quant. error / element", False, "sci"),
    "valid_loss": ("valid loss", False, "f4"),
    "psnr": ("PSNR (dB)", True, "f2"),
    "ssim": ("SSIM", True, "f3"),
}
# Row-name prefix -> title; the longest matching prefix names a row's family (vqgan_regime_ste is not a vqgan_ row).
FAMILIES = {"vqgan": "Table 3 regime: VQGAN, 8192 codes x 3",
            "vqgan_regime": "Regime arm: VQGAN, 128 codes x 3 (8 latent vectors per code in a batch, as the paper)",
            "vit": "Table 4 regime: ViT-VQGAN, 8192 codes x 32"}
# (row suffix, baseline suffix, what the difference means) compared within a family, paired by seed.
PAIRS: tuple[tuple[str, str, str], ...] = (("rot", "ste", "rotation (released) - STE"),
                                           ("rot_paper", "ste", "rotation (paper's formula) - STE"),
                                           ("rot", "rot_paper", "released - paper's formula"),
                                           # residual stages (issue 24): the rotation per stage vs over the sum
                                           ("rot_stage", "ste", "rotation per stage - STE"),
                                           ("rot_stage", "rot", "rotation per stage - over the sum"))
SCHEMA_PREFIX = "rotation-trick-eval/"
# The estimator, the one thing the arms of a comparison differ in: the gradient (both codebases' wrappers take it in
# model.params), and with enhancing's residual stages where the rotation applies (an STE row has no scope, so
# rotation per stage against STE is a pair too).
ESTIMATOR_KEYS = ("model.params.gradient", "model.params.quantizer.rotation_scope")


def family_of(row: str) -> Optional[str]:
    fams = [f for f in FAMILIES if row.startswith(f + "_")]
    return max(fams, key=len) if fams else None


def _canonical(node: Any) -> Any:
    """A copy of a config with every ``target:`` on its current module path: a record written before the layout moved
    (``adapters.ldm.RotationVQModel``) names the same class as one written after."""
    return canonical_targets(copy.deepcopy(node))


def config_fingerprint(rec: Mapping[str, Any]) -> str:
    """What must be equal for two records to be compared: the training config without the estimator (the one thing
    the arms of a comparison differ in), and the evaluation data. 12 hex digits of a sha256."""
    cfg = _canonical(json.loads(json.dumps(rec.get("config") or {}, default=str)))
    for key in ESTIMATOR_KEYS:  # popped in place, so a record without them hashes as it always did
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    data = {k: v for k, v in (rec.get("data") or {}).items() if k not in ("batch_size",)}
    blob = json.dumps({"config": cfg, "data": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, val in node.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted config keys whose values differ between two records (the estimator aside)."""
    fa, fb = (_flat(_canonical(json.loads(json.dumps(r.get("config") or {}, default=str)))) for r in (a, b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and k not in ESTIMATOR_KEYS)


def step_of(rec: Mapping[str, Any]) -> Optional[int]:
    return (rec.get("checkpoint") or {}).get("global_step")


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


def collect(out: Path, label: Optional[str] = None) -> dict[str, dict[int, dict[str, Any]]]:
    """row -> seed -> record (with ``_path``), from OUT/seed_<S>/results/*.json; rows are ``label/row`` with a
    label. A file that is not an evaluation record (another schema) is named on stderr and left out."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for seed_dir in sorted(out.glob("seed_*")):
        try:
            seed = int(seed_dir.name.split("_", 1)[1])
        except ValueError:
            continue
        for f in sorted((seed_dir / "results").glob("*.json")):
            rec = json.loads(f.read_text())
            if not str(rec.get("schema", "")).startswith(SCHEMA_PREFIX):
                print(f"seed_summary: {f} is not an evaluation record (schema {rec.get('schema')!r}); left out",
                      file=sys.stderr)
                continue
            rec["_path"] = str(f)
            rows.setdefault(f"{label}/{f.stem}" if label else f.stem, {})[seed] = rec
    return rows


def compare(rows: Mapping[str, Mapping[int, Mapping[str, Any]]], row: str, base: str, meaning: str,
            setting_varies: bool = False) -> dict[str, Any]:
    """Paired comparison of two rows over their common seeds. Records that differ in step or in config (estimator
    aside) are not compared: the result says which differ instead of giving verdicts (issue 16, item 9). With
    ``setting_varies`` (the same row under two settings, e.g. the init) the config differences are the point: they
    are listed in ``config_differs_in`` and the rows are compared when the steps agree."""
    seeds = sorted(set(rows[row]) & set(rows[base]))
    result: dict[str, Any] = {"row": row, "baseline": base, "meaning": meaning, "seeds": seeds, "metrics": {}}
    recs = [rows[r][s] for r in (row, base) for s in seeds]
    steps = sorted({str(step_of(r)) for r in recs})
    prints = {config_fingerprint(r) for r in recs}
    problems = []
    if len(steps) > 1:
        problems.append("steps differ: " + ", ".join(f"{r} seed {s} at {step_of(rows[r][s])}"
                                                     for r in (row, base) for s in seeds))
    if setting_varies:
        result["config_differs_in"] = sorted({k for s in seeds for k in config_diff(rows[row][s], rows[base][s])})
    elif len(prints) > 1:
        problems.append("configs differ beyond the estimator: " + ", ".join(
            f"{r} seed {s} {config_fingerprint(rows[r][s])}" for r in (row, base) for s in seeds))
    result["step"] = steps[0] if len(steps) == 1 else None
    if problems:
        result["not_comparable"] = "; ".join(problems)
        return result
    for k, (_, hb, _) in METRICS.items():
        a = [metrics_of(rows[row][s])[k] for s in seeds]
        b = [metrics_of(rows[base][s])[k] for s in seeds]
        if any(v is None for v in a + b):
            continue
        diffs = [x - y for x, y in zip(a, b)]
        result["metrics"][k] = {"diffs": diffs, **verdict(diffs, hb)}
    return result


def comparison_lines(c: Mapping[str, Any]) -> list[str]:
    head = f"**{c['row']} vs {c['baseline']}** ({c['meaning']}; paired by seed; seeds {', '.join(map(str, c['seeds']))}"
    head += f"; step {c['step']}" if c.get("step") else ""
    head += f"; configs differ in {', '.join(c['config_differs_in']) or 'nothing'})" if "config_differs_in" in c else ")"
    if c.get("not_comparable"):
        return [head + ": **not compared**, " + c["not_comparable"], ""]
    lines = [head + ":", "", f"| metric | {c['row']} - {c['baseline']} per seed | mean [95% t interval] | "
             f"verdict for {c['row']} | seeds better | basis |", "|---|---|---|---|---|---|"]
    for k, m in c["metrics"].items():
        title, _, kind = METRICS[k]
        lines.append(f"| {title} | {', '.join(fmt(d, kind) for d in m['diffs'])} | {interval_text(m, kind)} | "
                     f"{m['verdict']} | {m['signs']} | {m['basis']} |")
    return lines + [""]


def _family_rows(rows: Mapping[str, Any], family: str) -> list[str]:
    return sorted(r for r in rows if family_of(r.split("/")[-1]) == family)


def plot_family(rows: Mapping[str, Mapping[int, Mapping[str, Any]]], family: str, report: Path) -> list[str]:
    """The family's figures (training curves; per-code usage over the evaluation set), as Markdown image lines."""
    from seed_plots import plot_bands, plot_code_counts

    names = _family_rows(rows, family)
    kind = {r: r.split("/")[-1][len(family) + 1:] for r in names}
    lines = []
    curves = {r: [training_series(rec) for rec in rows[r].values()] for r in names}
    if plot_bands(curves, kind, CURVES, f"{FAMILIES[family]}\nmean over each {CURVE_BIN} steps; line = mean over "
                  "seeds, band = min..max", report / f"training_seeds_{family}.png"):
        lines.append(f"![training curves](training_seeds_{family}.png)")
    counts = {r: [rec["code_counts"] for rec in rows[r].values() if rec.get("code_counts")] for r in names}
    if plot_code_counts(counts, kind, f"{FAMILIES[family]}\nper-code usage over the evaluation images, one line "
                        "per seed", report / f"codebook_seeds_{family}.png"):
        lines.append(f"![codebook usage](codebook_seeds_{family}.png)")
    return lines + [""] if lines else []


def records_digest(rows: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[str]:
    from make_tables import record_digests

    return record_digests([r for per in rows.values() for r in per.values()])


def summarise(outs: Sequence[tuple[Optional[str], Path]], report: Path, command: Optional[str] = None,
              wall_seconds: Optional[float] = None, plots: bool = True, overwrite: bool = False,
              horizons: Sequence[int] = (), embed: bool = False,
              extra_pairs: Sequence[tuple[str, str]] = (), family: Optional[str] = None,
              seeds: Optional[Sequence[int]] = None) -> dict[str, Any]:
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for label, out in outs:
        rows.update(collect(out, label))
    if family:  # one codebase's rows (a study of both would pass the 1,000 lines a record may have)
        rows = {r: v for r, v in rows.items() if family_of(r.split("/", 1)[-1]) == family}
    if seeds is not None:  # the same seeds in every row, so that means and differences are over one seed set
        rows = {r: kept for r, v in rows.items() if (kept := {s: rec for s, rec in v.items() if s in seeds})}
        if not rows:
            raise SystemExit(f"seed_summary: no record of seeds {','.join(map(str, seeds))} in "
                             + ", ".join(str(out) for _, out in outs) + "; check --seeds")
    if embed:
        for path in embed_curves(rows):
            print(f"seed_summary: training curves kept in {path}", file=sys.stderr)
    digests = records_digest(rows)
    old = report / "seeds.json"
    # A summary that only grows (seeds or rows added beside its records, e.g. reproduce.sh --seeds 1 into the --out
    # of --seeds 0) is rewritten; one that would lose or replace a record it was made from needs --overwrite.
    kept = json.loads(old.read_text()).get("records") if old.is_file() else None
    gone = sorted(set(kept or ()) - set(digests))
    if gone and not overwrite:
        raise SystemExit(f"seed_summary: {old} was made from other records ({len(gone)} of its {len(kept)} are not "
                         "among these); write to another folder, or add --overwrite to replace it")
    report.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"command": command, "wall_seconds": wall_seconds, "records": digests, "rows": {},
                               "comparisons": [], "horizons": {}}
    lines = ["# Across-seed summary", ""]
    if command:
        lines += [f"Command: `{command}`" + (f" ({wall_seconds / 60:.1f} min wall)" if wall_seconds else ""), ""]
    labels = [label for label, _ in outs]
    for family, title in FAMILIES.items():
        fam_rows = _family_rows(rows, family)
        if not fam_rows:
            continue
        lines += [f"## {title}", "", "| row | seed | step | config | " + " | ".join(t for t, _, _ in METRICS.values())
                  + " |", "|---|---|---|---|" + "---|" * len(METRICS)]
        for row in fam_rows:
            per = {s: metrics_of(r) for s, r in sorted(rows[row].items())}
            entry: dict[str, Any] = {"per_seed": per, "steps": {s: step_of(r) for s, r in rows[row].items()},
                                     "config": {s: config_fingerprint(r) for s, r in rows[row].items()},
                                     "curves": {s: curve_points(r) for s, r in rows[row].items()}}
            for s, m in per.items():
                lines.append(f"| {row} | {s} | {step_of(rows[row][s])} | {config_fingerprint(rows[row][s])} | "
                             + " | ".join(fmt(m[k], kind) for k, (_, _, kind) in METRICS.items()) + " |")
            ms = {}
            for k, (_, _, kind) in METRICS.items():
                vals = [m[k] for m in per.values() if m[k] is not None]
                ms[k] = mean_std(vals) if vals else None
            entry["mean_std"] = ms
            summary["rows"][row] = entry
            lines.append(f"| **{row}** | mean ± std | | | " + " | ".join(
                "-" if ms[k] is None else f"{fmt(ms[k][0], kind)} ± {fmt(ms[k][1], kind)}"
                for k, (_, _, kind) in METRICS.items()) + " |")
        lines.append("")
        for label in labels:  # within one OUT: the estimator pairs
            pre = f"{label}/" if label else ""
            for a, b, meaning in PAIRS:
                row, base = f"{pre}{family}_{a}", f"{pre}{family}_{b}"
                if row in rows and base in rows:
                    c = compare(rows, row, base, meaning)
                    summary["comparisons"].append(c)
                    lines += comparison_lines(c)
        for i, la in enumerate(labels):  # across OUTs: the same row under another setting (e.g. the init)
            for lb in labels[i + 1:]:
                for row in sorted({r.split("/", 1)[1] for r in fam_rows if r.startswith(f"{la}/")}):
                    if f"{lb}/{row}" in rows:
                        c = compare(rows, f"{la}/{row}", f"{lb}/{row}", f"{la} - {lb}", setting_varies=True)
                        summary["comparisons"].append(c)
                        lines += comparison_lines(c)
        for row, base in extra_pairs:  # named pairs of any two rows (issue 24: restarts vs rotation across remedies)
            if row in fam_rows and base in rows:
                c = compare(rows, row, base, f"{row} - {base}", setting_varies=True)
                summary["comparisons"].append(c)
                lines += comparison_lines(c)
        if horizons:
            hl, summary["horizons"][family] = horizon_lines(rows, fam_rows, horizons)
            lines += hl
        if plots:
            lines += plot_family(rows, family, report)
    missing = [f"{row} seed {seed}" for row in sorted(rows) for seed, r in sorted(rows[row].items())
               if not training_series(r)]
    if missing:
        lines += ["No training curves (neither stored in the record nor a run folder beside it; left out of the "
                  "figures and the horizon table): " + ", ".join(missing) + ".", ""]
    lines += ["Verdicts: " + RULE + " Rows are compared only when their records share the step and the config "
              "(estimator aside; column `config`).", ""]
    (report / "seeds.md").write_text("\n".join(lines))
    (report / "seeds.json").write_text(dumps_record(summary, default=str))
    print("\n".join(lines))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outs", nargs="+", metavar="[LABEL=]OUT",
                   help="reproduce.sh --out folder(s) holding seed_<S>/results/*.json; with several, give each a label "
                        "(kmeans=outputs/a upstream=outputs/b): rows become LABEL/row and equal rows are compared across")
    p.add_argument("--out", dest="report", required=True, help="report folder")
    p.add_argument("--command", default=None)
    p.add_argument("--wall-seconds", type=float, default=None)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a summary made from other records")
    p.add_argument("--embed-curves", action="store_true",
                   help="write each record's training curves (50-step means, from its run folder) into the record, "
                        "so that figures and horizons survive the run folders")
    p.add_argument("--pairs", default="", help="extra comparisons of two named rows, ROW_A:ROW_B,... (labelled "
                                               "rows, e.g. ema_dead/vqgan_ste:ema/vqgan_rot), paired by seed")
    p.add_argument("--horizons", default="", help="training steps at which to read every row's training curves, "
                                                  "e.g. 200,2000 (the mean over the 50 steps up to each)")
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="only the rows of this codebase (e.g. vit: the remedies study's ViT-VQGAN summary)")
    p.add_argument("--seeds", default=None, help="keep only these seeds, e.g. 10,11,12 (a baseline with more seeds "
                                                "than the rows it is compared with)")
    a = p.parse_args(argv)
    outs = [(o.split("=", 1)[0], Path(o.split("=", 1)[1])) if "=" in o else (None, Path(o)) for o in a.outs]
    if len(outs) > 1 and any(label is None for label, _ in outs):
        p.error("with several OUT folders, give each a label: LABEL=OUT")
    horizons = [int(h) for h in a.horizons.split(",") if h]
    pairs = [tuple(x.split(":", 1)) for x in a.pairs.split(",") if x]
    if any(len(x) != 2 for x in pairs):
        p.error("--pairs takes ROW_A:ROW_B,... (e.g. ema_dead/vqgan_ste:ema/vqgan_rot)")
    try:
        seeds = None if a.seeds is None else [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds takes whole numbers separated by commas (e.g. 10,11,12), got {a.seeds!r}")
    return summarise(outs, Path(a.report), a.command, a.wall_seconds, not a.no_plots, a.overwrite, horizons,
                     a.embed_curves, pairs, a.family, seeds)


if __name__ == "__main__":
    main()
