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
    assert len([d for d in (tmp_path / "o" / "train" / "vqgan_ste").iterdir() if d.is_dir()]) == 1


def test_leftover_of_a_longer_run_is_never_evaluated_and_fresh_keeps_it_aside(tmp_path: Path) -> None:
    ckdir = tmp_path / "o" / "train" / "vit_ste" / "small_vitvqgan" / "vit_ste" / "ckpt"
    ckdir.mkdir(parents=True)
    for epoch in (11, 99, 120):  # text order puts epoch=99 last; the stored step says epoch=120
        torch.save({"global_step": 32 * (epoch + 1)}, ckdir / f"epoch={epoch}.ckpt")
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "lib" / "row_settings.py"), "made-by", "--trainer",
                           "enh", "--config", "small_vitvqgan", "--lr", "1e-4"], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout
    (tmp_path / "o" / "train" / "vit_ste" / "made_by.json").write_text(made)  # the same settings as asked below
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


# --- issue 23: what made a row (item 3), crash checkpoints (item 5), --checkpoints under --seeds (item 7) ----------
def test_a_record_made_with_another_init_is_never_skipped_as_finished(tmp_path: Path) -> None:
    res, _ = _run(tmp_path, "--rows", "vqgan_ste", "--steps", "64")
    assert res.returncode == 0, res.stderr
    made = json.loads((tmp_path / "o" / "results" / "vqgan_ste.json").read_text())["row"]["made_by"]
    assert made["init"] == "upstream" and len(made["fingerprint"]) == 12
    res, calls = _run(tmp_path, "--rows", "vqgan_ste", "--steps", "64", "--init", "kmeans")
    assert res.returncode == 2 and _trainer_calls(calls) == []
    assert "init 'upstream' (asked: 'kmeans')" in res.stderr and "--fresh" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # the leftover run folder (record gone) is not resumed under the other init either
    (tmp_path / "o" / "results" / "vqgan_ste.json").unlink()
    res, calls = _run(tmp_path, "--rows", "vqgan_ste", "--steps", "128", "--init", "kmeans")
    assert res.returncode == 2 and _trainer_calls(calls) == [] and "made_by.json" in res.stderr
    # the same settings resume; --fresh starts over with the new ones
    res, calls = _run(tmp_path, "--rows", "vqgan_ste", "--steps", "128")
    assert res.returncode == 0 and _trainer_calls(calls)[0].split()[1] == "-r"
    res, calls = _run(tmp_path, "--rows", "vqgan_ste", "--steps", "64", "--init", "kmeans", "--fresh")
    assert res.returncode == 0, res.stderr
    assert "codebook_init=kmeans" in _trainer_calls(calls)[0]


def test_a_vit_row_resumes_only_its_own_settings(tmp_path: Path) -> None:
    res, _ = _run(tmp_path, "--rows", "vit_ste", "--steps", "64", "--seed", "1")
    assert res.returncode == 0, res.stderr
    (tmp_path / "o" / "results" / "vit_ste.json").unlink()
    res, calls = _run(tmp_path, "--rows", "vit_ste", "--steps", "128", "--seed", "2")
    assert res.returncode == 2 and "seed 1 (asked: 2)" in res.stderr and _trainer_calls(calls) == []


def test_legacy_records_are_judged_by_their_saved_init(tmp_path: Path) -> None:
    results = tmp_path / "o" / "results"
    results.mkdir(parents=True)
    rec = {"schema": "rotation-trick-eval/1", "checkpoint": {"global_step": 64},
           "config": {"model": {"params": {"quantizer_config": {"codebook_init": "kmeans"}}}}}
    (results / "vqgan_ste.json").write_text(json.dumps(rec))
    res, calls = _run(tmp_path, "--rows", "vqgan_ste", "--steps", "64", "--init", "kmeans")
    assert res.returncode == 0 and "is finished" in res.stdout and _trainer_calls(calls) == []
    res, _ = _run(tmp_path, "--rows", "vqgan_ste", "--steps", "64")
    assert res.returncode == 2 and "init 'kmeans' (asked: 'upstream')" in res.stderr


def test_default_out_folders_differ_per_init_and_remedy() -> None:
    outs = []
    for extra in ([], ["--init", "kmeans"], ["--init", "kmeans", "--remedy", "ema"]):
        res = subprocess.run(["bash", str(SCRIPT), "--scale", "small", "--rows", "vqgan_ste", "--dry-run", *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        outs.append(next(w for w in res.stdout.split() if "/results/vqgan_ste.json" in w))
    assert outs[0].endswith("outputs/reproduce_small/results/vqgan_ste.json")
    assert "reproduce_small_kmeans/" in outs[1] and "reproduce_small_kmeans_ema/" in outs[2]


def test_remedy_rows_set_the_remedy_in_both_arms(tmp_path: Path) -> None:
    res, calls = _run(tmp_path, "--rows", "vqgan_ste,vqgan_rot", "--steps", "64", "--init", "kmeans",
                      "--remedy", "ema_dead")
    assert res.returncode == 0, res.stderr
    ste, rot = _trainer_calls(calls)
    for call in (ste, rot):
        assert "codebook_update=ema" in call and "dead_code_threshold=0.03" in call
    assert "small_rot_vqgan" in rot and "small_vqgan" in ste
    res, _ = _run(tmp_path, "--rows", "vqgan_ste", "--remedy", "ema")
    assert res.returncode == 2 and "--init kmeans" in res.stderr
    res, _ = _run(tmp_path, "--rows", "vqgan_ste", "--init", "kmeans", "--remedy", "ema8")
    assert res.returncode == 2 and "--remedy takes plain, ema, ema08" in res.stderr


def test_ema08_rows_are_the_ema_rows_at_decay_0_8(tmp_path: Path) -> None:
    """#167's setting: both arms get the EMA codebook and decay 0.8 (VQGAN overrides, ViT-VQGAN configs)."""
    res, calls = _run(tmp_path, "--rows", "vqgan_ste,vqgan_rot,vit_ste,vit_rot", "--steps", "64", "--init", "kmeans",
                      "--remedy", "ema08")
    assert res.returncode == 0, res.stderr
    ste, rot, vit_ste, vit_rot = _trainer_calls(calls)
    for call in (ste, rot):
        assert "codebook_update=ema" in call and "ema_decay=0.8" in call and "dead_code_threshold" not in call
    assert "small_kmeans_ema08_vitvqgan" in vit_ste and "small_kmeans_ema08_rot_vitvqgan" in vit_rot
    res, _ = _run(tmp_path, "--rows", "vqgan_ste", "--init", "kmeans", "--remedy", "residual")
    assert res.returncode == 2 and "unknown row 'vqgan_ste'" in res.stderr


def test_crash_checkpoints_are_never_resumed_unless_asked(tmp_path: Path) -> None:
    torch.save({"global_step": 300}, tmp_path / "epoch=9.ckpt")
    torch.save({"global_step": 320, "weights": torch.zeros(8)}, tmp_path / "crash.ckpt")
    lib = [sys.executable, str(ROOT / "scripts" / "lib" / "checkpoints.py"), "newest", str(tmp_path)]
    res = subprocess.run(lib, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and Path(res.stdout.strip()).name == "epoch=9.ckpt", res.stderr
    res = subprocess.run(lib + ["--include-crash"], capture_output=True, text=True, cwd=ROOT)
    assert Path(res.stdout.strip()).name == "crash.ckpt"


def test_stored_step_maps_the_file_instead_of_reading_its_tensors(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_checkpoints", ROOT / "scripts" / "lib" / "checkpoints.py")
    checkpoints = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checkpoints)
    torch.save({"global_step": 7, "state_dict": {"w": torch.zeros(1000)}}, tmp_path / "a.ckpt")
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k) or real(*a, **k))
    assert checkpoints.stored_step(tmp_path / "a.ckpt") == 7
    assert seen and seen[0].get("mmap") is True and seen[0].get("weights_only") is True


def test_checkpoints_with_seeds_is_refused(tmp_path: Path) -> None:
    res, calls = _run(tmp_path, "--seeds", "0,1", "--checkpoints", str(tmp_path))
    assert res.returncode == 2 and "--checkpoints and --seeds exclude each other" in res.stderr and calls == []


def test_embedding_curves_leaves_the_records_digest_unchanged(tmp_path: Path) -> None:
    # issue 23 item 4: seed_summary --embed-curves rewrites records after the per-seed reports digested them; a rerun
    # of the finished study must find "the same records".
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_tables import record_digests
    finally:
        sys.path.pop(0)
    src = ROOT / "docs" / "report" / "effect" / "kmeans" / "seed_1" / "results" / "vqgan_rot.json"
    rec = json.loads(src.read_text())
    assert rec.get("training_curves")
    with_curves, without = tmp_path / "a.json", tmp_path / "b.json"
    with_curves.write_text(json.dumps(rec))
    without.write_text(json.dumps({k: v for k, v in rec.items() if k != "training_curves"}))
    assert record_digests([{"_path": str(with_curves)}]) == record_digests([{"_path": str(without)}])
    rec["metrics"]["psnr"] += 1e-9  # but any other change is another record
    without.write_text(json.dumps(rec))
    assert record_digests([{"_path": str(with_curves)}]) != record_digests([{"_path": str(without)}])
