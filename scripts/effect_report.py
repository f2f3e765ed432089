#!/usr/bin/env python
"""Fill the effect study's tables in docs/report/README.md from the across-seed summary (scripts/seed_summary.py).

  python scripts/effect_report.py docs/report/effect/seeds.json docs/report/README.md           # rewrite the tables
  python scripts/effect_report.py docs/report/effect/seeds.json docs/report/README.md --check   # exit 1 if stale
  python scripts/effect_report.py docs/report/remedies/seeds.json docs/report/README.md --kind remedies
  python scripts/effect_report.py docs/report/remedies/vqgan/seeds.json docs/report/README.md --kind remedies_vqgan

The report keeps its prose by hand and its numbers here: each table sits between ``<!-- NAME -->`` and
``<!-- /NAME -->`` (MAIN: metrics at the last step, mean +- std over seeds; HORIZON: training curves at each horizon;
VERDICTS: per pair the verdict of seed_summary's rule, the mean paired difference [95% t interval], the sign count
and the differences per seed; with ``--kind remedies`` REMEDIES_MAIN and REMEDIES_VERDICTS, the collapse remedies'
section, issue 24, for the ViT-VQGAN, and with ``--kind remedies_vqgan`` REMEDIES_VQGAN_*, for the VQGAN; with ``--kind horizon`` LONG_HORIZON and LONG_MAIN). ``--check`` is what the tests run, so
a summary that changed without its report (or the reverse) is caught.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_summary import FAMILIES, METRICS, family_of, fmt, interval_text  # noqa: E402

CODEBOOKS = {"vqgan": "8192 x 3", "vqgan_regime": "128 x 3 (regime)", "vit": "ViT 8192 x 32"}
# every other label of the effect study used the k-means init; the horizon pair (issue 24 item 3) is taming's init
# trained 5x longer, and its table sits beside the 2,000-step rows of the same init
INITS = {"upstream": "upstream", "upstream_10k": "upstream, 10,000-step run"}
ESTIMATORS = {"ste": "STE", "rot": "rotation (released)", "rot_paper": "rotation (paper)",
              "rot_stage": "rotation per stage"}
# The remedies section (issue 24): a summary label -> the remedy its rows ran with; the plain labels are the baseline.
# (in the order the table lists them: the baseline first, then each remedy, the residual stages last)
REMEDIES = {"plain": "none", "ema": "EMA codebook", "ema08": "EMA codebook, decay 0.8 (#167)",
            "ema_dead": "EMA + dead-code restarts", "simvq": "SimVQ",
            "residual": "2 residual stages"}
PLAIN = ("plain",)
# remedies compared with another remedy on the same row: restarts on top of EMA, decay 0.8 against 0.99
STEPPED = {("ema_dead", "ema"), ("ema08", "ema")}
# The metrics of the MAIN table (all of seed_summary's but the per-element error) and of the VERDICTS table.
MAIN = ("codebook_usage_per_batch", "codebook_usage_whole_set", "perplexity_whole_set", "dead_codes", "quant_error",
        "valid_loss", "psnr", "ssim")
# its MAIN table adds the per-element error: upstream's commitment loss is beta times it (vector-quantize-pytorch #177)
REMEDY_MAIN = MAIN[:5] + ("quant_error_per_dim",) + MAIN[5:]
VERDICTS = ("codebook_usage_per_batch", "codebook_usage_whole_set", "quant_error", "valid_loss", "psnr", "ssim")


def describe(row: str) -> tuple[str, str, str]:
    """``label/family_estimator`` -> (codebook, init, estimator) as the report names them."""
    label, name = row.split("/", 1) if "/" in row else ("", row)
    family = family_of(name)
    if family is None:
        raise SystemExit(f"effect_report: row {row!r} is not of a known family ({', '.join(FAMILIES)})")
    return CODEBOOKS[family], INITS.get(label, "upstream" if label.startswith("upstream") else "k-means"), \
        ESTIMATORS.get(name[len(family) + 1:], name)


def ordered(rows: Sequence[str]) -> list[str]:
    """Family, then the labels in the summary's order, then STE before rotation."""
    labels = list(dict.fromkeys(r.split("/", 1)[0] for r in rows))
    est = list(ESTIMATORS)

    def key(r: str) -> tuple[int, int, int]:
        name = r.split("/", 1)[-1]
        fam = family_of(name) or ""
        return list(FAMILIES).index(fam), labels.index(r.split("/", 1)[0]), est.index(name[len(fam) + 1:]) \
            if name[len(fam) + 1:] in est else len(est)
    return sorted(rows, key=key)


def _cell(ms: Optional[Sequence[float]], kind: str, n: int) -> str:
    if ms is None:
        return "-"
    return fmt(ms[0], kind) if n < 2 else f"{fmt(ms[0], kind)} ± {fmt(ms[1], kind)}"


def _kind(metric: str) -> str:
    return "int" if metric == "perplexity_whole_set" else METRICS[metric][2]


def main_table(summary: Mapping[str, Any]) -> list[str]:
    titles = [METRICS[m][0] for m in MAIN]
    lines = ["| codebook | init | estimator | seeds | " + " | ".join(titles) + " |", "|---|---|---|---|" + "---|" * len(MAIN)]
    for row in ordered(list(summary["rows"])):
        e = summary["rows"][row]
        seeds = sorted(map(str, e["per_seed"]), key=int)
        lines.append("| " + " | ".join(describe(row)) + f" | {','.join(seeds)} | "
                     + " | ".join(_cell(e["mean_std"].get(m), _kind(m), len(seeds)) for m in MAIN) + " |")
    return lines


def horizon_table(summary: Mapping[str, Any]) -> list[str]:
    table = {row: e for fam in summary.get("horizons", {}).values() for row, e in fam.items()}
    if not table:
        return ["(no horizons in the summary: run seed_summary.py with --horizons)"]
    hs = sorted({int(k.split("@")[1]) for e in table.values() for k in e if "@" in k})
    lines = ["| codebook | init | estimator | seeds with curves | "
             + " | ".join(f"usage / batch @{h}" for h in hs) + " | " + " | ".join(f"quant. error @{h}" for h in hs)
             + " |", "|---|---|---|---|" + "---|" * (2 * len(hs))]
    for row in ordered(list(table)):
        e = table[row]
        n = len(e.get("seeds", []))
        cells = [_cell(e.get(f"{name}@{h}"), kind, n) for name, kind in (("codebook_usage", "pct"),
                                                                          ("quant_error", "sci")) for h in hs]
        lines.append("| " + " | ".join(describe(row)) + f" | {','.join(map(str, e.get('seeds', []))) or '-'} | "
                     + " | ".join(cells) + " |")
    return lines


def _diff(d: float, metric: str) -> str:
    kind = METRICS[metric][2]
    if kind == "pct":  # percentage points
        return f"{100 * d:+.2f}"
    return {"sci": f"{d:+.2e}", "f4": f"{d:+.4f}", "f2": f"{d:+.2f}", "f3": f"{d:+.3f}"}.get(kind, f"{d:+g}")


def remedy_main_table(summary: Mapping[str, Any]) -> list[str]:
    titles = [METRICS[m][0] for m in REMEDY_MAIN]
    lines = ["| codebook | remedy | estimator | seeds | " + " | ".join(titles) + " |",
             "|---|---|---|---|" + "---|" * len(REMEDY_MAIN)]
    order = list(REMEDIES)
    rows = ordered(list(summary["rows"]))  # family first, then the remedy in REMEDIES' order (stable: STE first)
    rows.sort(key=lambda r: (family_of(r.split("/", 1)[-1]) != "vqgan", order.index(r.split("/", 1)[0])
                             if r.split("/", 1)[0] in order else len(order)))
    for row in rows:
        e = summary["rows"][row]
        seeds = sorted(map(str, e["per_seed"]), key=int)
        codebook, _, estimator = describe(row)
        remedy = REMEDIES.get(row.split("/", 1)[0], row.split("/", 1)[0])
        lines.append(f"| {codebook} | {remedy} | {estimator} | {','.join(seeds)} | "
                     + " | ".join(_cell(e["mean_std"].get(m), _kind(m), len(seeds)) for m in REMEDY_MAIN) + " |")
    return lines


def remedy_question(c: Mapping[str, Any]) -> bool:
    """The comparisons the remedies section answers with: each remedy's estimator pair, each remedy against no
    remedy (same estimator), restarts on top of EMA, decay 0.8 against 0.99, and pairs named with seed_summary
    --pairs."""
    la, lb = c["row"].split("/", 1)[0], c["baseline"].split("/", 1)[0]
    same_row = c["row"].split("/", 1)[-1] == c["baseline"].split("/", 1)[-1]
    return la == lb or not same_row or lb in PLAIN or (la, lb) in STEPPED


def verdict_table(summary: Mapping[str, Any], keep: Any = None) -> list[str]:
    lines = ["| pair (first minus second) | seeds | " + " | ".join(METRICS[m][0] for m in VERDICTS) + " |",
             "|---|---|" + "---|" * len(VERDICTS)]
    for c in summary["comparisons"]:
        if keep is not None and not keep(c):
            continue
        head = f"| {c['row']} - {c['baseline']} | {','.join(map(str, c['seeds']))} | "
        if c.get("not_comparable"):
            lines.append(head + f"not compared: {c['not_comparable']} |" + " |" * (len(VERDICTS) - 1))
            continue
        cells = []
        for m in VERDICTS:
            v = c["metrics"].get(m)
            cells.append("-" if v is None else f"**{v['verdict']}** {interval_text(v, '', lambda d: _diff(d, m))}, "
                         f"{v['signs']} seeds better ({', '.join(_diff(d, m) for d in v['diffs'])})")
        lines.append(head + " | ".join(cells) + " |")
    return lines


def tables(summary: Mapping[str, Any], kind: str = "effect") -> dict[str, list[str]]:
    """The marked blocks of the report made from one summary: the effect study's, or the remedies section's."""
    if kind in ("remedies", "remedies_vqgan"):  # one summary per codebase (seed_summary --family)
        name = "REMEDIES" if kind == "remedies" else "REMEDIES_VQGAN"
        return {f"{name}_MAIN": remedy_main_table(summary),
                f"{name}_VERDICTS": verdict_table(summary, keep=remedy_question)}
    if kind == "horizon":
        return {"LONG_HORIZON": horizon_table(summary), "LONG_MAIN": main_table(summary)}
    return {"MAIN": main_table(summary), "HORIZON": horizon_table(summary), "VERDICTS": verdict_table(summary)}


def fill(text: str, blocks: Mapping[str, Sequence[str]]) -> str:
    """``text`` with the lines between ``<!-- NAME -->`` and ``<!-- /NAME -->`` replaced by each block."""
    for name, lines in blocks.items():
        pattern = re.compile(rf"(<!-- {name} -->\n)(.*?)(<!-- /{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"effect_report: the report has no '<!-- {name} -->' ... '<!-- /{name} -->' block; "
                             "add the two markers where the table belongs")
        text = pattern.sub(lambda m: m.group(1) + "\n".join(lines) + "\n" + m.group(3), text, count=1)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summary", type=Path, help="seeds.json written by scripts/seed_summary.py")
    p.add_argument("report", type=Path, help="the Markdown report holding the marked tables")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the report's tables are stale")
    p.add_argument("--kind", choices=["effect", "remedies", "remedies_vqgan", "horizon"], default="effect",
                   help="which blocks: effect (MAIN, HORIZON, VERDICTS), remedies (REMEDIES_MAIN, REMEDIES_VERDICTS: "
                        "the ViT-VQGAN's), remedies_vqgan (REMEDIES_VQGAN_MAIN, REMEDIES_VQGAN_VERDICTS) or horizon "
                        "(LONG_HORIZON, LONG_MAIN)")
    a = p.parse_args(argv)
    text = a.report.read_text()
    new = fill(text, tables(json.loads(a.summary.read_text()), a.kind))
    if a.check:
        if new != text:
            print(f"effect_report: the tables in {a.report} do not match {a.summary}; rerun without --check",
                  file=sys.stderr)
            return 1
        return 0
    a.report.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
