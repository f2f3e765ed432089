"""Compact evaluation records (issue 17, item 5) and the across-seed summary's comparability checks (issue 16,
items 4 and 9): both record forms read the same, records at other steps or configs are never compared."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

from adapters.evaluation.records import dumps_record, rewrite_compact

sys.path.insert(0, str(ROOT / "scripts"))
import make_tables  # noqa: E402
import seed_summary  # noqa: E402


REAL = json.loads((ROOT / "docs" / "report" / "small" / "seed_0" / "results" / "vqgan_rot.json").read_text())


def _record(row: str, gradient: str, seed: int, step: int = 2000, usage: float = 0.1, loss: float = 0.2,
            lr: float = 2.5e-5) -> dict:
    """A real committed record (192-step small VQGAN) with the fields under test set."""
    rec = json.loads(json.dumps(REAL))
    rec["config"]["model"]["base_learning_rate"] = lr
    rec["config"]["model"]["params"]["gradient"] = gradient
    rec["checkpoint"].update(path=f"/nowhere/{row}/{seed}.ckpt", global_step=step)
    rec["row"].update(gradient=gradient, approach="rotation" if gradient != "ste" else "ste",
                      label=f"{row} (seed {seed})")
    used = round(usage * 2 * 8192)
    rec["metrics"].update(codebook_usage_per_batch=usage, codebook_usage_whole_set=used / 8192,
                          used_codes_whole_set=used, valid_loss=loss)
    rec["code_counts"] = [1 + (i * 7 + seed) % 13 if i < used else 0 for i in range(8192)]
    rec["nested"] = [{"a": [1, 2]}, "text [1, 2]"]
    return rec


def test_compact_form_is_the_same_json_on_few_lines() -> None:
    rec = _record("vqgan_rot", "rotation_released", 0)
    text = dumps_record(rec)
    assert json.loads(text) == rec
    assert len(text.splitlines()) < 300  # 8,192 counts on one line; indent=1 took ~8,300 lines
    assert len(json.dumps(rec, indent=1).splitlines()) > 8192


def test_a_verdict_with_its_words_is_one_line() -> None:
    verdict = {"diffs": [0.1, -0.2], "mean": -0.05, "ci": [-1.0, 0.9], "signs": "1/2", "verdict": "too few seeds"}
    summary = {"comparisons": [{"row": "a", "metrics": {"psnr": verdict, "ssim": dict(verdict)}}]}
    lines = dumps_record(summary).splitlines()
    assert json.loads("\n".join(lines)) == summary
    assert sum('"verdict": "too few seeds"' in line for line in lines) == 2  # each verdict on the line of its metric
    assert any(line.strip().startswith('"psnr": {"diffs"') for line in lines)
    # shallower dicts keep one key per line (a record's top level, a comparison's own keys)
    assert any(line.strip() == '"row": "a",' for line in lines)


def test_a_seeds_curves_are_one_line_in_a_summary_and_keep_their_keys_in_a_record() -> None:
    curves = {"every": 50, "codebook_usage": [[25, 75], [0.1, 0.2]], "quant_error": [[25, 75], [0.5, 0.4]]}
    summary = {"rows": {"ema/vit_rot": {"curves": {"0": curves, "1": dict(curves)}}}}
    lines = dumps_record(summary).splitlines()
    assert json.loads("\n".join(lines)) == summary
    assert sum(line.strip().startswith('"0": {"every": 50, "codebook_usage": [[25, 75]') for line in lines) == 1
    record = {"training_curves": curves}  # a record's top-level keys stay one a line
    assert '"codebook_usage": [[25, 75], [0.1, 0.2]],' in [x.strip() for x in dumps_record(record).splitlines()]


def _write(out: Path, seed: int, row: str, rec: dict, compact: bool) -> Path:
    f = out / f"seed_{seed}" / "results" / f"{row}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(dumps_record(rec) if compact else json.dumps(rec, indent=1) + "\n")
    return f


@pytest.mark.parametrize("compact", [False, True])
def test_make_tables_and_seed_summary_read_both_forms_alike(tmp_path: Path, compact: bool) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    for seed in (0, 1, 2):
        for row, grad in (("vqgan_ste", "ste"), ("vqgan_rot", "rotation_released")):
            rec = _record(row, grad, seed, usage=0.1 + 0.01 * seed + (0.05 if grad != "ste" else 0))
            _write(ref, seed, row, rec, compact=False)
            _write(out, seed, row, rec, compact=compact)
    a, b = seed_summary.collect(ref), seed_summary.collect(out)
    for row in a:
        for seed in a[row]:
            assert seed_summary.metrics_of(a[row][seed]) == seed_summary.metrics_of(b[row][seed])
            assert a[row][seed]["code_counts"] == b[row][seed]["code_counts"]
    assert seed_summary.records_digest(a) == seed_summary.records_digest(b)  # the same records, either form
    ra = make_tables.load_records(sorted(ref.rglob("*.json")))
    rb = make_tables.load_records(sorted(out.rglob("*.json")))
    assert [r["metrics"] for r in ra] == [r["metrics"] for r in rb]


def test_rewrite_compact_keeps_the_content(tmp_path: Path) -> None:
    f = _write(tmp_path, 0, "vqgan_ste", _record("vqgan_ste", "ste", 0), compact=False)
    before = json.loads(f.read_text())
    assert rewrite_compact(f) and json.loads(f.read_text()) == before and not rewrite_compact(f)


def test_no_record_under_docs_is_long_or_spreads_a_list_over_lines() -> None:
    """Records stay small and diffable: no list of numbers one element a line (what made records ~8,400 lines),
    records under 1,000 lines, summaries (seeds.json: one line per seed, per seed's curves and per verdict; the
    remedies summary has ~20 rows of 3 to 5 seeds and ~35 pairs of 9 metrics) under 1,500."""
    long, spread = [], []
    for p in (ROOT / "docs").rglob("*.json"):
        lines = p.read_text().splitlines()
        if len(lines) > (1500 if p.name == "seeds.json" else 1000):
            long.append(str(p.relative_to(ROOT)))
        # a line holding only a number: an element of a list spread one a line
        if any(re.fullmatch(r"\s*-?[0-9][0-9.eE+-]*,?", x) for x in lines):
            spread.append(str(p.relative_to(ROOT)))
    assert long == [] and spread == [], \
        f"rewrite them with: python -m adapters.evaluation.records {' '.join(sorted(set(long + spread)))}"


def _summary(tmp_path: Path, records: dict, **kw) -> dict:
    out = tmp_path / "runs"
    for (seed, row), rec in records.items():
        _write(out, seed, row, rec, compact=True)
    return seed_summary.summarise([(None, out)], tmp_path / "report", plots=False, **kw)


def _comparison(summary: dict, row: str, base: str) -> dict:
    return next(c for c in summary["comparisons"] if c["row"] == row and c["baseline"] == base)


def test_released_vs_paper_formula_is_compared_and_verdicts_follow_the_sign_rule(tmp_path: Path) -> None:
    recs = {}
    for seed in (0, 1, 2):
        recs[(seed, "vqgan_ste")] = _record("vqgan_ste", "ste", seed, loss=0.30)
        recs[(seed, "vqgan_rot")] = _record("vqgan_rot", "rotation_released", seed, loss=0.25 + 0.01 * seed)
        recs[(seed, "vqgan_rot_paper")] = _record("vqgan_rot_paper", "rotation", seed, loss=0.24 + 0.02 * (seed == 1))
    s = _summary(tmp_path, recs)
    assert _comparison(s, "vqgan_rot", "vqgan_ste")["metrics"]["valid_loss"]["verdict"] == "better"
    # released - paper: +0.01, -0.01 (seed 1: 0.26 vs 0.26 -> 0), +0.03: not every seed agrees
    c = _comparison(s, "vqgan_rot", "vqgan_rot_paper")
    assert c["meaning"] == "released - paper's formula"
    assert c["metrics"]["valid_loss"]["verdict"] == "no clear difference"
    assert "released - paper's formula" in (tmp_path / "report" / "seeds.md").read_text()


def test_records_at_other_steps_or_configs_are_not_compared(tmp_path: Path) -> None:
    recs = {}
    for seed in (0, 1):
        recs[(seed, "vqgan_ste")] = _record("vqgan_ste", "ste", seed)
        recs[(seed, "vqgan_rot")] = _record("vqgan_rot", "rotation_released", seed, step=192 if seed else 2000)
        recs[(seed, "vit_ste")] = _record("vit_ste", "ste", seed)
        recs[(seed, "vit_rot")] = _record("vit_rot", "rotation_released", seed, lr=1e-4)  # another lr: stale record
    s = _summary(tmp_path, recs)
    c = _comparison(s, "vqgan_rot", "vqgan_ste")
    assert c["metrics"] == {} and "steps differ" in c["not_comparable"] and "at 192" in c["not_comparable"]
    c = _comparison(s, "vit_rot", "vit_ste")
    assert c["metrics"] == {} and "configs differ beyond the estimator" in c["not_comparable"]
    assert "not compared" in (tmp_path / "report" / "seeds.md").read_text()


def test_an_existing_summary_is_not_overwritten_unasked(tmp_path: Path) -> None:
    recs = {(0, "vqgan_ste"): _record("vqgan_ste", "ste", 0), (0, "vqgan_rot"): _record("vqgan_rot", "rotation", 0)}
    _summary(tmp_path, recs)
    _summary(tmp_path, recs)  # the same records: rewriting the same summary is fine
    recs[(0, "vqgan_rot")] = _record("vqgan_rot", "rotation", 0, usage=0.5)
    with pytest.raises(SystemExit, match="made from other records.*--overwrite"):
        _summary(tmp_path, recs)
    _summary(tmp_path, recs, overwrite=True)


def test_a_summary_grows_with_new_seeds_but_never_drops_a_record(tmp_path: Path) -> None:
    recs = {(0, "vqgan_ste"): _record("vqgan_ste", "ste", 0), (0, "vqgan_rot"): _record("vqgan_rot", "rotation", 0)}
    _summary(tmp_path, recs)
    recs.update({(1, "vqgan_ste"): _record("vqgan_ste", "ste", 1), (1, "vqgan_rot"): _record("vqgan_rot", "rotation", 1)})
    s = _summary(tmp_path, recs)  # seed 1 added beside seed 0 (reproduce.sh --seeds 1 into the same --out): rewritten
    assert sorted(s["rows"]["vqgan_rot"]["per_seed"]) == [0, 1]
    del recs[(1, "vqgan_rot")]
    (tmp_path / "runs" / "seed_1" / "results" / "vqgan_rot.json").unlink()  # a record gone: the summary would lose it
    with pytest.raises(SystemExit, match=r"other records \(1 of its 4 are not among these\).*--overwrite"):
        _summary(tmp_path, recs)


def test_cli_compares_the_same_row_across_labelled_runs(tmp_path: Path) -> None:
    for label, usage in (("kmeans", 0.3), ("upstream", 0.01)):
        for row, grad in (("vqgan_ste", "ste"), ("vqgan_rot", "rotation_released")):
            rec = _record(row, grad, 0, usage=usage)
            if label == "kmeans":
                rec["config"]["model"]["params"]["quantizer_config"] = {"codebook_init": "kmeans"}
            _write(tmp_path / label, 0, row, rec, compact=True)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "seed_summary.py"), f"kmeans={tmp_path / 'kmeans'}",
                          f"upstream={tmp_path / 'upstream'}", "--out", str(tmp_path / "r"), "--no-plots"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    s = json.loads((tmp_path / "r" / "seeds.json").read_text())
    rows = {(c["row"], c["baseline"]) for c in s["comparisons"]}
    assert ("kmeans/vqgan_rot", "kmeans/vqgan_ste") in rows
    # across the init the configs differ by design (codebook_init): compared, and the difference is named
    across = next(c for c in s["comparisons"] if c["row"] == "kmeans/vqgan_ste")
    assert across["baseline"] == "upstream/vqgan_ste" and "not_comparable" not in across
    assert across["config_differs_in"] == ["model.params.quantizer_config.codebook_init"]
    assert across["metrics"]["codebook_usage_per_batch"]["diffs"] == [pytest.approx(0.29)]
    assert "configs differ in model.params.quantizer_config.codebook_init" in (tmp_path / "r" / "seeds.md").read_text()


def test_seeds_keeps_one_seed_set_in_every_row_and_refuses_none(tmp_path: Path) -> None:
    """A baseline with 5 seeds beside remedy rows with 3: --seeds 1,2,3 makes every mean and pair over those 3."""
    for seed in range(5):
        for row, grad in (("vqgan_ste", "ste"), ("vqgan_rot", "rotation_released")):
            _write(tmp_path / "plain", seed, row, _record(row, grad, seed, usage=0.1 + 0.01 * seed ** 2), compact=True)
    for seed in (1, 2, 3):
        _write(tmp_path / "ema", seed, "vqgan_ste", _record("vqgan_ste", "ste", seed, usage=0.2), compact=True)
    script = [sys.executable, str(ROOT / "scripts" / "seed_summary.py"), f"plain={tmp_path / 'plain'}",
              f"ema={tmp_path / 'ema'}", "--no-plots"]
    res = subprocess.run(script + ["--out", str(tmp_path / "r"), "--seeds", "1,2,3"], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    s = json.loads((tmp_path / "r" / "seeds.json").read_text())
    assert {r: sorted(map(int, e["per_seed"])) for r, e in s["rows"].items()} == {
        "plain/vqgan_ste": [1, 2, 3], "plain/vqgan_rot": [1, 2, 3], "ema/vqgan_ste": [1, 2, 3]}
    mean = s["rows"]["plain/vqgan_ste"]["mean_std"]["codebook_usage_per_batch"][0]
    assert mean == pytest.approx((0.11 + 0.14 + 0.19) / 3)  # seeds 1, 2, 3 (all five: 0.16)
    assert s["rows"]["plain/vqgan_ste"]["mean_std"]["codebook_usage_per_batch"][1] == pytest.approx(0.04041, abs=1e-4)
    assert all(c["seeds"] == [1, 2, 3] for c in s["comparisons"] if "not_comparable" not in c)
    res = subprocess.run(script + ["--out", str(tmp_path / "r2"), "--seeds", "7,8"], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode != 0 and "no record of seeds 7,8" in res.stderr and "--seeds" in res.stderr
    res = subprocess.run(script + ["--out", str(tmp_path / "r3"), "--seeds", "1,x"], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 2 and "--seeds takes whole numbers" in res.stderr


def _logged_runs(tmp_path: Path) -> dict:
    """Two seeds x (STE, rotation) records whose run folders log usage and quantization error at steps 9, 19, ...,
    1999, as Lightning does here (usage = scale * step / 1000 + seed / 100, error = 1 / step)."""
    recs = {}
    for seed in (0, 1):
        for row, grad, scale in (("vqgan_ste", "ste", 1.0), ("vqgan_rot", "rotation_released", 2.0)):
            run = tmp_path / "logs" / f"{row}{seed}"
            (run / "checkpoints").mkdir(parents=True)
            lines = ["step,train/codebook_usage_step,train/quant_error_step"]
            lines += [f"{s},{scale * s / 1000 + seed * 0.01},{1.0 / s}" for s in range(9, 2000, 10)]
            (run / "metrics.csv").write_text("\n".join(lines) + "\n")
            rec = _record(row, grad, seed)
            rec["checkpoint"]["path"] = str(run / "checkpoints" / "last.ckpt")
            recs[(seed, row)] = rec
    return recs


def test_horizon_table_reads_each_rows_training_curves(tmp_path: Path) -> None:
    """The usage and quantization error at each horizon: the mean of the logged steps in (h - 50, h], per seed."""
    s = _summary(tmp_path, _logged_runs(tmp_path), horizons=(200, 2000))
    h = s["horizons"]["vqgan"]
    # steps 159..199 for @200: mean step 179 -> usage 0.179 (STE) + seed offset; two seeds -> +0.005 on average
    assert h["vqgan_ste"]["codebook_usage@200"][0] == pytest.approx(0.179 + 0.005)
    assert h["vqgan_rot"]["codebook_usage@2000"][0] == pytest.approx(2 * 1.979 + 0.005)
    assert h["vqgan_rot"]["seeds"] == [0, 1]
    assert "usage / batch @200" in (tmp_path / "report" / "seeds.md").read_text()
    steps, means = s["rows"]["vqgan_rot"]["curves"][0]["codebook_usage"]  # kept for redrawing: 40 bins of 50 steps
    assert steps == [50.0 * k for k in range(1, 41)] and means[0] == pytest.approx(2 * 0.029)


def test_embedded_curves_outlive_the_run_folders(tmp_path: Path) -> None:
    """--embed-curves writes each record's 50-step curves into it; with the run folders gone the horizon table and
    the stored curves are the same, and a record with neither is named instead of silently missing."""
    import shutil

    recs = _logged_runs(tmp_path)
    first = _summary(tmp_path, recs, horizons=(200, 1000, 2000), embed=True, overwrite=True)
    shutil.rmtree(tmp_path / "logs")
    stored = json.loads((tmp_path / "runs" / "seed_1" / "results" / "vqgan_ste.json").read_text())
    assert stored["training_curves"]["every"] == 50 and len(stored["training_curves"]["quant_error"][0]) == 40
    again = seed_summary.summarise([(None, tmp_path / "runs")], tmp_path / "report2", plots=False,
                                   horizons=(200, 1000, 2000))
    assert again["horizons"] == first["horizons"]
    assert again["rows"]["vqgan_rot"]["curves"] == first["rows"]["vqgan_rot"]["curves"]
    # a record without curves and without its run folder: left out of the horizon table, and said so
    f = tmp_path / "runs" / "seed_1" / "results" / "vqgan_rot.json"
    rec = json.loads(f.read_text())
    del rec["training_curves"]
    f.write_text(dumps_record(rec))
    third = seed_summary.summarise([(None, tmp_path / "runs")], tmp_path / "report3", plots=False, horizons=(2000,))
    assert third["horizons"]["vqgan"]["vqgan_rot"]["seeds"] == [0]
    assert "No training curves" in (tmp_path / "report3" / "seeds.md").read_text()
    assert "vqgan_rot seed 1" in (tmp_path / "report3" / "seeds.md").read_text()


def test_records_from_before_and_after_the_layout_move_are_compared(tmp_path: Path) -> None:
    """A record naming adapters.ldm.RotationVQModel (before issue 15's layout) and one naming
    adapters.integrations.ldm.RotationVQModel name the same class: same fingerprint, no config difference."""
    old = _record("vqgan_ste", "ste", 0)
    new = _record("vqgan_rot", "rotation_released", 0)
    old["config"]["model"]["target"] = "adapters.ldm.RotationVQModel"
    new["config"]["model"]["target"] = "adapters.integrations.ldm.RotationVQModel"
    assert seed_summary.config_fingerprint(old) == seed_summary.config_fingerprint(new)
    assert seed_summary.config_diff(old, new) == []
    new["config"]["model"]["target"] = "adapters.integrations.ldm.GumbelVQModel"
    assert seed_summary.config_diff(old, new) == ["model.target"]


def test_the_rotation_scope_is_part_of_the_estimator_and_nothing_else_is(tmp_path: Path) -> None:
    """Residual stages: STE, rotation over the sum and rotation per stage differ only in the estimator (gradient and
    ``rotation_scope``), so all three pairs are compared; a record without a scope hashes as before the key existed;
    any other quantizer difference still keeps two rows apart."""
    ste, total, stage = (_record(r, g, 0) for r, g in (("vit_ste", "ste"), ("vit_rot", "rotation_released"),
                                                        ("vit_rot_stage", "rotation_released")))
    for rec in (ste, total, stage):
        rec["config"]["model"]["params"]["quantizer"] = {"num_quantizers": 2, "use_residual": True}
    stage["config"]["model"]["params"]["quantizer"]["rotation_scope"] = "stage"
    assert len({seed_summary.config_fingerprint(r) for r in (ste, total, stage)}) == 1
    assert seed_summary.config_diff(stage, ste) == []
    rows = {"vit_ste": {0: ste}, "vit_rot_stage": {0: stage}}
    assert "not_comparable" not in seed_summary.compare(rows, "vit_rot_stage", "vit_ste", "m")
    # the fingerprint as it was before the scope key (gradient popped, nothing else): committed summaries keep theirs
    old = seed_summary._canonical(json.loads(json.dumps(total["config"])))
    old["model"]["params"].pop("gradient")
    data = {k: v for k, v in total["data"].items() if k != "batch_size"}
    blob = json.dumps({"config": old, "data": data}, sort_keys=True)
    assert seed_summary.config_fingerprint(total) == hashlib.sha256(blob.encode()).hexdigest()[:12]
    stage["config"]["model"]["params"]["quantizer"]["num_quantizers"] = 3
    assert seed_summary.config_diff(stage, ste) == ["model.params.quantizer.num_quantizers"]
    assert "configs differ beyond the estimator" in seed_summary.compare(rows, "vit_rot_stage", "vit_ste", "m")[
        "not_comparable"]


def test_figures_training_curves_and_codebook_rank_frequency(tmp_path: Path) -> None:
    s = seed_summary.summarise([(None, _logged_runs_written(tmp_path))], tmp_path / "report", plots=True)
    md = (tmp_path / "report" / "seeds.md").read_text()
    for name in ("training_seeds_vqgan.png", "codebook_seeds_vqgan.png"):
        assert (tmp_path / "report" / name).stat().st_size > 10_000 and f"({name})" in md
    import seed_plots

    assert not seed_plots.plot_code_counts({"vqgan_ste": [[0] * 8]}, {"vqgan_ste": "ste"}, "t", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists() and s["rows"]


def _logged_runs_written(tmp_path: Path) -> Path:
    out = tmp_path / "runs"
    for (seed, row), rec in _logged_runs(tmp_path).items():
        _write(out, seed, row, rec, compact=True)
    return out


def test_each_label_of_a_figure_gets_its_own_line_style() -> None:
    """The remedies study draws five labels in one figure: the fifth must not repeat the first's style."""
    import seed_plots

    rows = [f"{label}/vit_{e}" for label in ("ema", "ema_dead", "plain", "residual", "simvq") for e in ("ste", "rot")]
    styles = seed_plots._styles(rows)
    assert len({repr(styles[f"{label}/vit_ste"]) for label in ("ema", "ema_dead", "plain", "residual", "simvq")}) == 5
    assert all(styles[f"{label}/vit_ste"] == styles[f"{label}/vit_rot"] for label in ("ema", "simvq"))
    assert seed_plots.COLOURS["rot_stage"] not in (seed_plots.COLOURS["ste"], seed_plots.COLOURS["rot"])
