"""scripts/bench_train_step.py: a two-step timing run per codebase, and its errors for configs it cannot compare."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, requires_enhancing, requires_ldm

SCRIPT = ROOT / "scripts" / "bench_train_step.py"
CONFIGS = ROOT / "configs"
# | config | gradient | median s/step | ratio | median of per-round ratios |
ROW = re.compile(r"^\| (\S+) \| (\S+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", re.M)


def bench(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def rows(stdout: str) -> list[tuple[str, str, float, float, float]]:
    return [(n, g, float(s), float(r), float(p)) for n, g, s, r, p in ROW.findall(stdout)]


@requires_ldm
def test_latent_diffusion_configs_on_synthetic_images(tmp_path: Path) -> None:
    # run from elsewhere: the script finds the project and the tree itself
    r = bench(str(CONFIGS / "tiny_vqgan.yaml"), str(CONFIGS / "tiny_rot_vqgan.yaml"), "--steps", "2", "--rounds", "2",
              "--warmup", "1", "--threads", "1", "--synthetic", "64", "--batch-size", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("latent-diffusion; device: cpu, 1 threads; 2 rounds x 2 steps (+1 warm-up)")
    table = rows(r.stdout)
    assert [(n, g) for n, g, *_ in table] == [("tiny_vqgan.yaml", "ste"), ("tiny_rot_vqgan.yaml", "rotation_released")]
    assert table[0][3:] == (1.0, 1.0) and all(sec > 0 and ratio > 0 for _, _, sec, ratio, _ in table)
    assert len(re.findall(r"^round \d/2 .* over 2 steps$", r.stderr, re.M)) == 4


@requires_enhancing
def test_enhancing_configs_on_their_own_data() -> None:
    r = bench("configs/tiny_vitvqgan.yaml", "configs/tiny_rot_vitvqgan.yaml", "--steps", "2", "--rounds", "1",
              "--warmup", "1", "--threads", "1", "--lr", "2e-4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("enhancing-transformers; device: cpu, 1 threads")
    table = rows(r.stdout)
    assert [(n, g) for n, g, *_ in table] == [("tiny_vitvqgan.yaml", "ste"),
                                              ("tiny_rot_vitvqgan.yaml", "rotation_released")]
    assert table[1][2] > 0 and table[1][3] == pytest.approx(table[1][2] / table[0][2], rel=0.02)


def test_configs_of_two_codebases_or_neither_give_one_clear_error(tmp_path: Path) -> None:
    r = bench("configs/tiny_vqgan.yaml", "configs/tiny_vitvqgan.yaml")
    assert r.returncode == 1 and "configs of one codebase only" in r.stderr
    assert "tiny_vqgan.yaml (latent-diffusion)" in r.stderr and "tiny_vitvqgan.yaml (enhancing-transformers)" in r.stderr
    odd = tmp_path / "odd.yaml"
    odd.write_text("model: {target: x}\ntrain: {}\n")
    r = bench(str(odd))
    assert r.returncode == 1 and "not a training config of either codebase" in r.stderr and "data:" in r.stderr
    r = bench(str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "not found" in r.stderr


def test_entries_carry_their_own_overrides_and_bad_ones_are_one_line() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_train_step import split_entry
    finally:
        sys.path.pop(0)
    assert split_entry("configs/a.yaml@x.y=1,z=ema") == (Path("configs/a.yaml"), ["x.y=1", "z=ema"])
    assert split_entry("configs/a.yaml") == (Path("configs/a.yaml"), [])
    r = bench(str(CONFIGS / "tiny_vqgan.yaml"), str(CONFIGS / "tiny_vqgan.yaml") + "@model.params.gradient")
    assert r.returncode != 0 and "overrides after '@' are key=value" in r.stderr
    assert "Traceback" not in r.stderr


@requires_ldm
def test_a_remedy_override_runs_beside_its_reference(tmp_path: Path) -> None:
    remedy = "model.params.quantizer_config.codebook_update=ema"
    r = bench(str(CONFIGS / "tiny_vqgan.yaml"), f"{CONFIGS / 'tiny_vqgan.yaml'}@{remedy}", "--steps", "2",
              "--rounds", "1", "--warmup", "1", "--threads", "1", "--synthetic", "64", "--batch-size", "2",
              cwd=tmp_path)
    if r.returncode != 0 and "codebook_update" in r.stderr and "unknown" in r.stderr:
        pytest.fail("the quantizer does not know codebook_update: " + r.stderr[-500:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [n for n, *_ in rows(r.stdout)] == ["tiny_vqgan.yaml", "tiny_vqgan.yaml@codebook_update=ema"]
