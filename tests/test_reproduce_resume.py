"""scripts/reproduce.sh reruns (issue 16 item 3, issue 17 item 2): finished rows are skipped, unfinished ones resume in
their own folder, checkpoints are chosen by the step stored in them, --fresh keeps the earlier run aside. The
trainers and the evaluation are faked (tests/fixtures/fake_trainers): only the script's decisions are under test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "reproduce.sh"
FAKE = ROOT / "tests" / "fixtures" / "fake_trainers" / "python"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp / "calls.log"
    log.write_text("")
    env = dict(os.environ, PYTHON=str(FAKE), REAL_PYTHON=sys.executable, FAKE_LOG=str(log))
    res = subprocess.run(["bash", str(SCRIPT), "--scale", "small", "--out", str(tmp / "o"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    return res, log.read_text().splitlines()


def _trainer_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if "main.py" in c]


def _record_step(tmp: Path, row: str) -> int:
    return json.loads((tmp / "o" / "results" / f"{row}.json").read_text())["checkpoint"]["global_step"]


def test_rerun_skips_finished_rows_and_resumes_unfinished_ones(tmp_path: Path) -> None:
    res, calls = _run(tmp_path, "--rows", "vqgan_ste,vit_ste", "--steps", "64")
    assert res.returncode == 0, res.stderr
    assert len(_trainer_calls(calls)) == 2 and _record_step(tmp_path, "vqgan_ste") == 64

    res, calls = _run(tmp_path, "--rows", "vqgan_ste,vit_ste", "--steps", "64")
    assert res.returncode == 0, res.stderr
    assert _trainer_calls(calls) == [] and res.stdout.count("is finished") == 2

    res, calls = _run(tmp_path, "--rows", "vqgan_ste,vit_ste", "--steps", "128")
    assert res.returncode == 0, res.stderr
    ldm, enh = _trainer_calls(calls)
    assert ldm.split()[1] == "-r" and "--base" not in ldm  # the same run folder, its saved config
    assert " -r " in enh and "epoch=1.ckpt" in enh  # from the step-64 checkpoint
    assert _record_step(tmp_path, "vqgan_ste") == 128 and _record_step(tmp_path, "vit_ste") == 128
    assert len(list((tmp_path / "o" / "train" / "vqgan_ste").iterdir())) == 1


def test_leftover_of_a_longer_run_is_never_evaluated_and_fresh_keeps_it_aside(tmp_path: Path) -> None:
    ckdir = tmp_path / "o" / "train" / "vit_ste" / "small_vitvqgan" / "vit_ste" / "ckpt"
    ckdir.mkdir(parents=True)
    for epoch in (11, 99, 120):  # text order puts epoch=99 last; the stored step says epoch=120
        torch.save({"global_step": 32 * (epoch + 1)}, ckdir / f"epoch={epoch}.ckpt")
    res, _ = _run(tmp_path, "--rows", "vit_ste", "--steps", "64")
    assert res.returncode != 0
    assert "epoch=120.ckpt) is at step 3872, not 64" in res.stderr and "--fresh" in res.stderr
    assert not (tmp_path / "o" / "results" / "vit_ste.json").exists()

    res, calls = _run(tmp_path, "--rows", "vit_ste", "--steps", "64", "--fresh")
    assert res.returncode == 0, res.stderr
    assert " -r " not in _trainer_calls(calls)[0] and _record_step(tmp_path, "vit_ste") == 64
    kept = list((tmp_path / "o" / "previous").rglob("epoch=120.ckpt"))
    assert len(kept) == 1  # moved, not deleted


def test_two_vqgan_runs_in_one_row_folder_are_refused(tmp_path: Path) -> None:
    for stamp in ("2026-01-01T00-00-00_a", "2026-01-02T00-00-00_b"):
        (tmp_path / "o" / "train" / "vqgan_ste" / stamp / "checkpoints").mkdir(parents=True)
    res, calls = _run(tmp_path, "--rows", "vqgan_ste", "--steps", "64")
    assert res.returncode == 2 and "holds 2 runs" in res.stderr and "--fresh" in res.stderr
    assert _trainer_calls(calls) == []


def test_newest_checkpoint_is_chosen_by_stored_step(tmp_path: Path) -> None:
    for name, step in (("epoch=99.ckpt", 3200), ("epoch=121.ckpt", 3904), ("epoch=5.ckpt", 192)):
        torch.save({"global_step": step}, tmp_path / name)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "lib" / "checkpoints.py"), "newest", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).name == "epoch=121.ckpt" and "skipped" in res.stderr and "broken.ckpt" in res.stderr
