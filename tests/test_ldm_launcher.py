"""scripts/train_vqgan.sh: the commands it builds for CPU, one node, torchrun on several nodes, SLURM and resume."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import LDM_TREE, ROOT, requires_ldm

SCRIPT = ROOT / "scripts" / "train_vqgan.sh"
pytestmark = requires_ldm  # the script checks that main.py exists before building anything


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_one_node_ddp_command() -> None:
    res = launch("--config", "configs/rot_vqgan_64.yaml", "--gpus", "0,1,2,3", "--dry-run", "--",
                 "lightning.trainer.max_steps=5")
    assert res.returncode == 0, res.stderr
    out = res.stdout.replace("\\", "")
    assert f"{LDM_TREE / 'main.py'} --base {ROOT / 'configs' / 'rot_vqgan_64.yaml'} -t" in out
    assert "--gpus 0,1,2,3," in out and out.strip().endswith("lightning.trainer.max_steps=5")
    assert "torch.distributed.run" not in out


def test_single_gpu_id_keeps_the_trailing_comma_and_cpu_has_no_gpus() -> None:
    assert "--gpus 0," in launch("--config", "configs/vqgan_32.yaml", "--gpus", "0", "--dry-run").stdout.replace(
        "\\", "")
    assert "--gpus" not in launch("--config", "configs/tiny_rot_vqgan.yaml", "--dry-run").stdout


def test_several_nodes_with_torchrun() -> None:
    res = launch("--config", "configs/rot_vqgan_32.yaml", "--gpus", "0,1", "--nodes", "2", "--node-rank", "1",
                 "--master-addr", "node0", "--run-time", "2025-01-01T00-00-00", "--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout.replace("\\", "")
    for part in ("-m torch.distributed.run", "--nnodes 2", "--nproc_per_node 2", "--node_rank 1",
                 "--master_addr node0", "--num_nodes 2"):
        assert part in out, part
    missing = launch("--config", "configs/rot_vqgan_32.yaml", "--gpus", "0,1", "--nodes", "2", "--node-rank", "0",
                     "--master-addr", "node0", "--dry-run")
    assert missing.returncode == 2 and "--run-time" in missing.stderr


def test_slurm_template(tmp_path: Path) -> None:
    res = launch("--config", "configs/rot_vqgan_64.yaml", "--gpus", "0,1,2,3", "--nodes", "4", "--slurm",
                 "--partition", "gpu", "--data", str(tmp_path), "--logdir", str(tmp_path / "logs"))
    assert res.returncode == 0, res.stderr
    script = res.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4",
                 "#SBATCH --partition=gpu", f"export IMAGENET_ROOT={tmp_path}", "export LDM_MAIN_RUN_TIME="):
        assert line in script, line
    assert "srun " in script and "--num_nodes 4" in script
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_resume_and_argument_errors(tmp_path: Path) -> None:
    run = tmp_path / "2025-01-01T00-00-00_rot_vqgan_64"
    (run / "checkpoints").mkdir(parents=True)
    res = launch("--resume", str(run), "--gpus", "0,", "--dry-run")
    assert res.returncode == 0 and f"-r {run} -t" in res.stdout.replace("\\", "")
    for args, message in [
        (["--resume", str(tmp_path / "nope")], "does not exist"),
        (["--config", "configs/nope.yaml"], "not found"),
        (["--config", "configs/vqgan_64.yaml", "--gpus", "cuda:0"], "GPU ids"),
        (["--config", "configs/vqgan_64.yaml", "--data", str(tmp_path / "no-data")], "not a folder"),
        (["--config", "configs/vqgan_64.yaml", "--bogus"], "unknown argument"),
        ([], "--config"),
    ]:
        res = launch(*args, "--dry-run")
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)


def test_slurm_job_requeued_after_preemption_resumes_its_own_run_folder(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    res = launch("--config", "configs/rot_vqgan_64.yaml", "--gpus", "0,1", "--slurm", "--name", "r64",
                 "--logdir", str(logs), "--", "lightning.trainer.max_steps=5")
    assert res.returncode == 0, res.stderr
    script = res.stdout
    for line in ("#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert line in script, line  # Lightning's SLURM environment saves and requeues on SIGUSR1
    # Run the job script twice with srun stubbed: the first start trains the config, a requeued start resumes.
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/usr/bin/env bash\necho \"$@\"\n")
    (stub / "srun").chmod(0o755)
    env = {"PATH": f"{stub}:/usr/bin:/bin", "HOME": str(tmp_path)}
    first = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "--base" in first.stdout and "-n r64" in first.stdout and " -r " not in first.stdout
    (run_dir,) = [line.split("=", 1)[1] for line in script.splitlines() if line.startswith("RUN_DIR=")]
    assert Path(run_dir).name.endswith("_r64") and Path(run_dir).parent == logs
    (Path(run_dir) / "checkpoints").mkdir(parents=True)
    (Path(run_dir) / "checkpoints" / "last.ckpt").write_bytes(b"")
    again = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    out = again.stdout
    assert f"-r {run_dir} -t" in out and "--base" not in out and "-n r64" not in out
    assert out.strip().endswith("lightning.trainer.max_steps=5")
