"""scripts/make_tables.py: Tables 3/4 beside the paper from fixture records, direction summary, plots, logs."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "eval"


def _module():
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "scripts" / "make_tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_tables"] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


MT = _module()


def _csv_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_tables_from_fixture_records(tmp_path) -> None:
    res = MT.main([str(FIXTURES), "--out", str(tmp_path)])
    assert res["records"] == 5
    for name in ("table3.md", "table3.csv", "table4.md", "table4.csv", "direction.md", "direction.json",
                 "codebook_usage_table3.png", "codebook_usage_table4.png", "training_table3.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    assert "![training_table3.png](training_table3.png)" in report and "Same direction as the paper in" in report
    md = (tmp_path / "table3.md").read_text()
    assert "| VQGAN w/ rotation trick | 64x64x3 | 8192 | paper | 50000 | 86% |" in md
    assert "ours: fixture rotation" in md and "ours: fixture Gumbel" in md

    rows = _csv_rows(tmp_path / "table3.csv")
    assert len(rows) == 6 + 3 * 2  # six paper rows; three of ours, each with a difference row
    paper = next(r for r in rows if r["source"] == "paper" and r["approach"] == "ste" and r["setting"] == "64x64x3")
    ours = next(r for r in rows if r["source"] == "ours" and r["approach"] == "ste")
    diff = next(r for r in rows if r["source"] == "ours - paper" and r["approach"] == "ste")
    for key in ("codebook_usage_per_batch", "quant_error", "valid_loss", "r_fid", "r_is"):
        assert float(diff[key]) == pytest.approx(float(ours[key]) - float(paper[key])), key
    assert float(paper["codebook_usage_per_batch"]) == pytest.approx(0.15)
    assert ours["images"] == "16" and paper["images"] == "50000"
    # The STE run's training log (Lightning CSV next to the record) provides its train loss.
    assert float(ours["train_loss"]) == pytest.approx(0.19)

    t4 = _csv_rows(tmp_path / "table4.csv")
    reported = next(r for r in t4 if r["approach"] == "reported")
    assert float(reported["r_fid"]) == pytest.approx(22.8) and reported["codebook_usage_per_batch"] == ""
    rot4 = next(r for r in t4 if r["source"] == "ours - paper" and r["approach"] == "rotation")
    assert float(rot4["r_fid"]) == pytest.approx(12.0 - 11.2)


def test_direction_summary_reports_agreement_and_disagreement(tmp_path) -> None:
    src = tmp_path / "records"
    shutil.copytree(FIXTURES, src)
    rot = json.loads((src / "t3_rot_64.json").read_text())
    rot["metrics"]["r_fid"] = 5.0  # now worse than the STE fixture's 0.9: opposite to the paper
    (src / "t3_rot_64.json").write_text(json.dumps(rot))
    res = MT.make_tables([src], tmp_path / "out", plots=False)
    items = {(d["table"], d["baseline"], d["metric"]): d for d in res["directions"]}
    assert items[(3, "ste", "r-FID")]["agrees"] is False and items[(3, "ste", "r-FID")]["ours"] == "worse"
    assert items[(3, "ste", "Usage (per batch)")]["agrees"] is True
    assert items[(3, "gumbel", "Valid loss")]["paper"] == "better"
    # Table 4 in the paper: rotation has the larger quantization error; the fixture too.
    assert items[(4, "ste", "Quant. error")]["paper"] == "worse" and items[(4, "ste", "Quant. error")]["agrees"]
    md = (tmp_path / "out" / "direction.md").read_text()
    assert "**no**" in md


def test_tensorboard_scalars_are_read(tmp_path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "run" / "tb"))
    for step in range(5):
        w.add_scalar("train/codebook_usage_step", 0.1 * step, step)
    w.close()
    series = MT.read_scalars(tmp_path / "run")
    assert [s for s, _ in series["train/codebook_usage_step"]] == [0, 1, 2, 3, 4]
    assert series["train/codebook_usage_step"][-1][1] == pytest.approx(0.4)
    assert MT.pick_series(series, "codebook_usage") == series["train/codebook_usage_step"]


def test_log_dir_found_next_to_checkpoint(tmp_path) -> None:
    run = tmp_path / "logs" / "2026-01-01_tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("epoch,step,train/quant_error_step\n0,0,0.5\n0,10,0.25\n")
    rec = {"checkpoint": {"path": str(run / "checkpoints" / "last.ckpt")}, "row": {}}
    assert MT.find_log_dir(rec) == run
    assert MT.pick_series(MT.read_scalars(run), "quant_error") == [(0, 0.5), (10, 0.25)]


def test_a_deleted_run_folder_never_borrows_another_runs_logs(tmp_path) -> None:
    """reproduce.sh's layout: OUT/seed_S/train/<row>/<run>/checkpoints/last.ckpt. With the STE row's run folder
    gone and the rotation row's still there, the STE record has no logs (it used to get rotation's curves)."""
    train = tmp_path / "seed_2" / "train"
    rot = train / "vqgan_rot" / "2026-12-02_rot"
    (rot / "checkpoints").mkdir(parents=True)
    (rot / "csv").mkdir()
    (rot / "csv" / "metrics.csv").write_text("epoch,step,train/quant_error_step\n0,9,0.5\n")
    ste = {"checkpoint": {"path": str(train / "vqgan_ste" / "2026-12-02_ste" / "checkpoints" / "last.ckpt")}, "row": {}}
    assert MT.find_log_dir(ste) is None
    (train / "vqgan_ste").mkdir()  # the row folder kept, its run deleted: still not the rotation run's logs
    assert MT.find_log_dir(ste) is None
    assert MT.find_log_dir({"checkpoint": {"path": str(rot / "checkpoints" / "last.ckpt")}, "row": {}}) == rot


def test_no_records_is_one_clear_error(tmp_path) -> None:
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="no evaluation records"):
        MT.make_tables([tmp_path], tmp_path / "out")
    with pytest.raises(ValueError, match="not an evaluation record"):
        MT.make_tables([tmp_path / "other.json"], tmp_path / "out")


def test_paper_rows_are_consistent() -> None:
    t3 = [r for r in MT.PAPER if r.table == 3]
    assert {(r.setting, r.approach) for r in t3} == {(s, a) for s in ("64x64x3", "32x32x4")
                                                     for a in ("ste", "gumbel", "rotation")}
    for r in MT.PAPER:
        assert r.usage is None or 0 <= r.usage <= 1
        assert (r.quant_error is None) == (r.approach in ("gumbel", "reported"))
    assert MT.paper_row(4, "rotation", "anything").r_fid == pytest.approx(11.2)
    assert MT.paper_row(3, "rotation", "16x16x3") is None
