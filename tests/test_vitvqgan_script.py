"""scripts/train_vitvqgan.sh: the commands it builds, its errors, and one real CPU run of the STE tiny config."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, requires_enhancing

pytestmark = requires_enhancing
SCRIPT = ROOT / "scripts" / "train_vitvqgan.sh"


def script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_one_node_gpus_and_data(tmp_path: Path) -> None:
    r = script("--config", "rot_vitvqgan_small", "--gpus", "0,1", "--data", str(tmp_path), "--run-id", "r1",
               "--logdir", str(tmp_path / "logs"), "--dry-run")
    assert r.returncode == 0, r.stderr
    cmd = r.stdout
    assert cmd.startswith("CUDA_VISIBLE_DEVICES=0,1 ") and f"IMAGENET_ROOT={tmp_path}" in cmd
    assert "third_party/enhancing-transformers/main.py -c rot_vitvqgan_small -e 10 -lr 1e-4" in cmd
    assert " -ng 2 -nn 1 " in cmd and f"-o {tmp_path / 'logs'}" in cmd and "-np" not in cmd
    assert str(tmp_path / "logs" / "rot_vitvqgan_small" / "r1") in r.stderr


def test_several_nodes_torchrun_and_slurm() -> None:
    r = script("--config", "vitvqgan_small", "--gpus", "0,1,2,3", "--nodes", "2", "--node-rank", "1",
               "--master-addr", "host0", "--run-id", "shared", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "ENHANCING_RUN_ID=shared" in r.stdout and "torch.distributed.run --nnodes 2 --node_rank 1" in r.stdout
    assert "--nproc_per_node 4" in r.stdout and "-ng 4 -nn 2" in r.stdout
    r = script("--config", "vitvqgan_small", "--gpus", "0,1,2,3", "--nodes", "4", "--slurm", "--partition", "p")
    assert r.returncode == 0, r.stderr
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4",
                 "#SBATCH --partition=p", "export ENHANCING_RUN_ID="):
        assert line in r.stdout
    assert "srun " in r.stdout and "-ng 4 -nn 4" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--config", "nope"], "configs/nope.yaml not found"),
    (["--config", "tiny_vitvqgan", "--gpus", "x"], "--gpus takes GPU ids"),
    (["--config", "tiny_vitvqgan", "--gpus", "0", "--nodes", "2"], "--node-rank, --master-addr and the same --run-id"),
    (["--resume", "/nonexistent/run"], "does not exist"),
    (["--config", "tiny_vitvqgan", "--bogus"], "unknown argument"),
])
def test_bad_arguments_give_one_clear_error(args: list[str], message: str) -> None:
    r = script(*args, "--dry-run")
    assert r.returncode == 2 and message in r.stderr


@pytest.mark.slow
def test_cpu_run_then_resume_from_the_run_folder(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    env = {"OMP_NUM_THREADS": "1"}
    r = script("--config", "tiny_vitvqgan", "--epochs", "1", "--logger", "csv", "--logdir", str(logs),
               "--run-id", "a", "--", "-b", "1000", env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    run = logs / "tiny_vitvqgan" / "a"
    assert (run / "ckpt" / "tiny_vitvqgan-epoch=00.ckpt").is_file()
    r = script("--resume", str(run), "--epochs", "2", "--logger", "csv", "--logdir", str(logs), "--run-id", "b",
               "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "-c tiny_vitvqgan" in r.stdout and f"-r {run}/ckpt/tiny_vitvqgan-epoch=00.ckpt" in r.stdout
    state = torch.load(run / "ckpt" / "tiny_vitvqgan-epoch=00.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 8
