"""scripts/train_vitvqgan.sh: the commands it builds, its errors, and one real CPU run of the STE tiny config."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from adapters.runtime.console import run_summary
from conftest import ROOT, requires_enhancing

pytestmark = requires_enhancing
SCRIPT = ROOT / "scripts" / "train_vitvqgan.sh"


def script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # the launcher runs $PYTHON (default: `python` on PATH): the interpreter running these tests, activated or not
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


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


def _checkpoints(run: Path, **mtimes: float) -> None:
    """Empty checkpoint files in a run folder with the given modification times (name -> seconds since the epoch);
    a name starting with hpc_ckpt goes in the run folder (Lightning's SLURM requeue), others in ckpt/."""
    (run / "ckpt").mkdir(parents=True, exist_ok=True)
    for name, t in mtimes.items():
        f = run / name if name.startswith("hpc_ckpt") else run / "ckpt" / name
        f.touch()
        os.utime(f, (t, t))


def _resumed_from(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    args = r.stdout.split()
    return args[args.index("-r") + 1]


def test_resume_goes_on_in_the_run_folder_from_its_newest_checkpoint(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run = logs / "tiny_vitvqgan" / "20240101_000000"
    ep = {f"tiny_vitvqgan-epoch={i:02d}.ckpt": 1000.0 + i for i in range(3)}
    _checkpoints(run, **ep)
    r = script("--resume", str(run), "--dry-run")
    # the run's own logdir, config and run id: main.py writes <logdir>/<config>/<run-id>, i.e. into `run`
    assert r.stdout.startswith("ENHANCING_RUN_ID=20240101_000000 ") and f" -o {logs} " in r.stdout
    assert " -c tiny_vitvqgan " in r.stdout and f"run folder: {run} " in r.stderr
    assert _resumed_from(r) == str(run / "ckpt" / "tiny_vitvqgan-epoch=02.ckpt")
    # a .ckpt inside the run folder: the same folder, that checkpoint; explicit --logdir/--run-id that agree are fine
    r = script("--resume", str(run / "ckpt" / "tiny_vitvqgan-epoch=00.ckpt"), "--logdir", str(logs),
               "--run-id", run.name, "--dry-run")
    assert _resumed_from(r).endswith("epoch=00.ckpt") and "ENHANCING_RUN_ID=20240101_000000 " in r.stdout
    # RunGuard's last.ckpt wins a tie with the newest; a stale one (saved at an earlier stop) does not
    _checkpoints(run, **{"last.ckpt": 1002.0})
    assert _resumed_from(script("--resume", str(run), "--dry-run")) == str(run / "ckpt" / "last.ckpt")
    _checkpoints(run, **{"last.ckpt": 1001.5})
    assert _resumed_from(script("--resume", str(run), "--dry-run")).endswith("epoch=02.ckpt")
    # crash.ckpt is never picked by itself; a SLURM requeue checkpoint in the run folder is
    _checkpoints(run, **{"crash.ckpt": 2000.0})
    assert _resumed_from(script("--resume", str(run), "--dry-run")).endswith("epoch=02.ckpt")
    _checkpoints(run, **{"hpc_ckpt_1.ckpt": 1500.0})
    assert _resumed_from(script("--resume", str(run), "--dry-run")) == str(run / "hpc_ckpt_1.ckpt")


def test_second_resume_finds_the_first_resumes_checkpoint(tmp_path: Path) -> None:
    """The first resume writes into the run folder, so the second one goes on from what the first one saved."""
    run = tmp_path / "logs" / "tiny_vitvqgan" / "r"
    _checkpoints(run, **{"tiny_vitvqgan-epoch=00.ckpt": 1000.0})
    first = script("--resume", str(run), "--dry-run")
    assert _resumed_from(first).endswith("epoch=00.ckpt")
    # what main.py, started by `first`, does: it writes its checkpoints into <-o>/<-c>/<ENHANCING_RUN_ID>/ckpt
    args = first.stdout.split()
    written = Path(args[args.index("-o") + 1]) / args[args.index("-c") + 1] / first.stdout.split()[0].split("=")[1]
    assert written == run
    _checkpoints(written, **{"tiny_vitvqgan-epoch=01.ckpt": 1001.0, "last.ckpt": 1001.0})
    assert _resumed_from(script("--resume", str(run), "--dry-run")) == str(run / "ckpt" / "last.ckpt")
    assert sorted(p.name for p in run.parent.iterdir()) == ["r"]  # no new run folder beside it


def test_resumed_slurm_job_goes_on_from_the_newest_checkpoint_when_requeued(tmp_path: Path) -> None:
    run = tmp_path / "logs" / "tiny_vitvqgan" / "r"
    _checkpoints(run, **{"tiny_vitvqgan-epoch=00.ckpt": 1000.0, "tiny_vitvqgan-epoch=01.ckpt": 1001.0})
    r = script("--resume", str(run / "ckpt" / "tiny_vitvqgan-epoch=00.ckpt"), "--gpus", "0", "--slurm")
    assert r.returncode == 0, r.stderr
    job = r.stdout.replace("\nsrun ", "\necho ").replace(f"cd {ROOT}", "cd .")  # run the job script, not srun
    for restarts, expected in (("0", "epoch=00.ckpt"), ("1", "epoch=01.ckpt")):
        out = subprocess.run(["bash", "-c", job], capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "SLURM_RESTART_COUNT": restarts})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1].endswith(expected) and "-c tiny_vitvqgan" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--run-id", "other"], "--run-id other differs from the run's (r)"),
    (["--logdir", "/elsewhere"], "--logdir /elsewhere differs"),
    (["--config", "tiny_rot_vitvqgan"], "--config tiny_rot_vitvqgan differs"),
])
def test_resume_refuses_a_different_run_folder(tmp_path: Path, args: list[str], message: str) -> None:
    run = tmp_path / "logs" / "tiny_vitvqgan" / "r"
    _checkpoints(run, **{"tiny_vitvqgan-epoch=00.ckpt": 1000.0})
    r = script("--resume", str(run), *args, "--dry-run")
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1 and not r.stdout


def test_resume_of_what_is_not_a_run(tmp_path: Path) -> None:
    r = script("--resume", str(tmp_path), "--dry-run")
    assert r.returncode == 2 and "is not a run folder" in r.stderr
    (tmp_path / "ckpt").mkdir()
    r = script("--resume", str(tmp_path), "--dry-run")
    assert r.returncode == 2 and "no checkpoint in" in r.stderr
    loose = tmp_path / "weights.ckpt"
    loose.touch()
    r = script("--resume", str(loose), "--dry-run")
    assert r.returncode == 2 and "give --config NAME to start a new run from it" in r.stderr
    r = script("--resume", str(loose), "--config", "tiny_vitvqgan", "--run-id", "new", "--logdir",
               str(tmp_path / "logs"), "--dry-run")
    assert _resumed_from(r) == str(loose) and f"run folder: {tmp_path / 'logs' / 'tiny_vitvqgan' / 'new'}" in r.stderr


@pytest.mark.slow
def test_cpu_run_then_resume_twice_in_the_same_run_folder(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    env = {"OMP_NUM_THREADS": "1"}
    r = script("--config", "tiny_vitvqgan", "--epochs", "1", "--logger", "csv", "--logdir", str(logs),
               "--run-id", "a", "--", "-b", "1000", env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    run = logs / "tiny_vitvqgan" / "a"
    first = run / "ckpt" / "tiny_vitvqgan-epoch=00.ckpt"
    assert first.is_file()
    # the quiet console (patch 11): configs saved, not printed; Lightning's info lines gone; a summary at the end
    assert f"Configs: {run / 'configs'}" in r.stdout and (run / "configs" / "model.yaml").is_file()
    assert "Experiment config" not in r.stdout and "| Name " not in r.stdout + r.stderr
    summary = r.stdout[r.stdout.index("Done. Run folder:"):]
    assert str(run) in summary and f"checkpoint: {first}" in summary and "log/results/val/reconstructions_gs-" in summary
    rows = (run / "log" / "csv" / "metrics.csv").read_text().splitlines()
    # first resume, for real: one more epoch, written into the same run folder
    r = script("--resume", str(run), "--epochs", "2", "--logger", "csv", "--", "-b", "1000", env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"Restoring states from the checkpoint path at {first}" in r.stdout + r.stderr
    assert sorted(p.name for p in logs.joinpath("tiny_vitvqgan").iterdir()) == ["a"]  # no new run folder
    second = run / "ckpt" / "tiny_vitvqgan-epoch=01.ckpt"
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == [first.name, second.name]
    data = OmegaConf.load(ROOT / "configs" / "tiny_vitvqgan.yaml").dataset.params
    per_epoch = data.train.params.length // data.batch_size  # one global step per batch
    assert torch.load(first, map_location="cpu", weights_only=False)["global_step"] == per_epoch
    assert torch.load(second, map_location="cpu", weights_only=False)["global_step"] == 2 * per_epoch
    # the first start's CSV rows were kept (Lightning deletes metrics.csv), the resumed start wrote its own
    kept = sorted((run / "log" / "csv").glob("metrics-*.csv"))
    assert len(kept) == 1 and kept[0].read_text().splitlines() == rows
    assert (run / "log" / "csv" / "metrics.csv").is_file()
    # second resume: goes on from what the first resume saved, not from the run's first checkpoint
    r = script("--resume", str(run), "--epochs", "3", "--logger", "csv", "--dry-run")
    assert _resumed_from(r) == str(second) and "ENHANCING_RUN_ID=a " in r.stdout


def test_run_summary_of_an_enhancing_run_folder(tmp_path: Path) -> None:
    """adapters.runtime.console.run_summary(layout="enhancing"): log/results/ pictures, the newest checkpoint (never
    crash.ckpt), the resume command, the CSV file when that logger ran."""
    for split in ("train", "val"):
        (tmp_path / "log" / "results" / split).mkdir(parents=True)
        for step in (2, 10):
            for kind in ("originals", "reconstructions", "codebook_usage"):
                (tmp_path / "log" / "results" / split / f"{kind}_gs-{step:06}_e-000000_b-000000.png").touch()
    _checkpoints(tmp_path, **{"c-epoch=00.ckpt": 1000.0, "last.ckpt": 1001.0, "crash.ckpt": 2000.0})
    text = "\n".join(run_summary(tmp_path, layout="enhancing", config="c"))
    assert "log/results/val/reconstructions_gs-000010" in text and "gs-000002" not in text
    assert f"checkpoint: {tmp_path / 'ckpt' / 'last.ckpt'}" in text
    assert f"main.py -c c -r {tmp_path / 'ckpt' / 'last.ckpt'}" in text and f"--resume {tmp_path}" in text
    assert f"tensorboard --logdir {tmp_path / 'log'}" in text
    (tmp_path / "log" / "csv").mkdir()
    (tmp_path / "log" / "csv" / "metrics.csv").touch()
    assert f"curves: {tmp_path / 'log' / 'csv' / 'metrics.csv'}" in "\n".join(run_summary(tmp_path, "enhancing"))
