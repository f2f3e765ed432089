"""Long runs that survive, through the real latent-diffusion main.py (patched) in a subprocess on CPU: a SIGKILL
mid-epoch resumes at the last step-interval checkpoint, a failed resume leaves every checkpoint byte-identical,
SIGTERM/SIGUSR1 save and exit 0, Ctrl-C during a resume writes nothing and Ctrl-C after a step saves once (through
the run guard, not upstream's SetupCallback), a diverged run stops with one line, -r takes any checkpoint path,
accumulation runs, a moved run folder resumes into its own last.ckpt, a misspelt section stops the run.

Each run is a few tiny steps (8-crop epochs of 64x64 images, batch 4). Marked ``longrun``: the quick suite skips
them with ``-m "not longrun"``; CI runs them whenever the tree is present.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from conftest import LDM_TREE, ROOT, requires_ldm

pytestmark = [requires_ldm, pytest.mark.ldm, pytest.mark.longrun]

MAIN = LDM_TREE / "main.py"
TINY = ["--base", "configs/tiny_rot_vqgan.yaml", "-t"]
FAST = ["data.params.train.params.length=64", "data.params.validation.params.length=4",
        "lightning.callbacks.image_logger.params.batch_frequency=1000"]


def _env(extra_path: Optional[Path] = None) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT)] + ([str(extra_path)] if extra_path else []))
    env = dict(os.environ, PYTHONPATH=path, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LDM_MAIN_RUN_TIME", None)  # each run its own folder
    return env


def _foreground_sigint() -> None:
    """In the child, before exec: SIGINT as in a terminal's foreground. A shell starts background jobs (nohup ... &)
    with SIGINT ignored, which exec keeps; the Ctrl-C tests would then send a signal nobody receives."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_main(args: list[str], logdir: Path, timeout: int = 300,
             extra_path: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAIN), "-l", str(logdir), *args], cwd=ROOT, env=_env(extra_path),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=_foreground_sigint)


def start_main(args: list[str], logdir: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(MAIN), "-l", str(logdir), *args], cwd=ROOT, env=_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=_foreground_sigint)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # files this test wrote


def only_run(logs: Path) -> Path:
    (run_dir,) = [p for p in logs.iterdir() if p.is_dir()]
    return run_dir


def wait_for_run(logs: Path, timeout: float = 120) -> Path:
    """The run folder, once main.py has made it."""
    end = time.time() + timeout
    while not any(logs.glob("*/checkpoints")) and time.time() < end:
        time.sleep(0.2)
    return only_run(logs)


def wait_for_step(proc: subprocess.Popen, ckpt: Path, step: int, log: Path, timeout: float = 240) -> dict:
    """Poll until ``ckpt`` holds at least ``step`` (the interval save renames a whole file into place)."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, f"main.py ended early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        if ckpt.is_file():
            state = load(ckpt)
            if state["global_step"] >= step:
                return state
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s:\n{log.read_text()[-3000:]}")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def failed(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (interval saves every 2 steps); tests copy it before touching it."""
    logs = tmp_path_factory.mktemp("trained") / "logs"
    proc = run_main([*TINY, "lightning.trainer.max_steps=4", *FAST,
                     "lightning.callbacks.run_guard.params.every_n_train_steps=2"], logs)
    assert proc.returncode == 0, failed(proc)
    return only_run(logs)


def copy_run(run_dir: Path, dest: Path) -> Path:
    target = dest / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def test_sigkill_mid_epoch_resumes_at_the_last_interval_checkpoint_with_both_optimizers(tmp_path: Path) -> None:
    logs, log = tmp_path / "logs", tmp_path / "first.log"
    # 16 steps per epoch; last.ckpt every 3 steps, so the kill lands mid-epoch after an interval save.
    proc = start_main([*TINY, "lightning.trainer.max_steps=200", *FAST,
                       "lightning.callbacks.run_guard.params.every_n_train_steps=3"], logs, log)
    try:
        ckpt = wait_for_run(logs) / "checkpoints" / "last.ckpt"
        wait_for_step(proc, ckpt, 6, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = load(ckpt)
    step = saved["global_step"]
    assert step % 3 == 0 and 6 <= step < 16, step  # an interval save, mid-epoch
    assert len(saved["optimizer_states"]) == 2  # autoencoder and discriminator
    assert all(s["state"] for s in saved["optimizer_states"])  # Adam moments of both, not a fresh optimizer
    assert not list(ckpt.parent.glob("*.tmp-*"))  # no half-written file left by the kill

    resumed = run_main(["-r", str(ckpt.parent.parent), "-t", f"lightning.trainer.max_steps={step + 2}"], logs)
    assert resumed.returncode == 0, failed(resumed)
    assert f"RunGuard: training from step {step};" in resumed.stdout + resumed.stderr
    final = load(ckpt)
    assert final["global_step"] == step + 2
    ae_steps = [v["step"] for v in final["optimizer_states"][0]["state"].values()]
    assert all(float(s) == step + 2 for s in ae_steps)  # Adam continued from the restored state


@pytest.mark.parametrize("how", ["config_mismatch", "truncated_checkpoint"])
def test_failed_resume_leaves_every_checkpoint_byte_identical(trained_run: Path, tmp_path: Path, how: str) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    if how == "truncated_checkpoint":
        data = (ckpts / "last.ckpt").read_bytes()
        (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
        extra = []
    else:
        extra = ["model.params.n_embed=256"]
    before = digests(ckpts)
    proc = run_main(["-r", str(run_dir), "-t", "lightning.trainer.max_steps=8", *extra], tmp_path / "unused")
    assert proc.returncode != 0, failed(proc)
    assert digests(ckpts) == before
    assert "no checkpoint written" in proc.stdout + proc.stderr or how == "truncated_checkpoint"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_exits_zero(tmp_path: Path, signum: int) -> None:
    logs, log = tmp_path / "logs", tmp_path / "run.log"
    proc = start_main([*TINY, "lightning.trainer.max_steps=200", *FAST,
                       "lightning.callbacks.run_guard.params.every_n_train_steps=2"], logs, log)
    ckpt = wait_for_run(logs) / "checkpoints" / "last.ckpt"
    wait_for_step(proc, ckpt, 2, log)
    proc.send_signal(signum)
    rc = proc.wait(timeout=120)
    out = log.read_text()
    assert rc == 0, out[-3000:]
    assert "RunGuard: stopped at step" in out
    stopped = int(out.split("RunGuard: stopped at step ")[1].split()[0])
    assert load(ckpt)["global_step"] == stopped >= 2
    assert stopped < 16  # stopped within the epoch, not at its end


# A callback main.py loads from the config (lightning.callbacks.ctrl_c.target=ctrl_c_probe.CtrlC): Ctrl-C as a
# terminal sends it (SIGINT to the process) in on_fit_start or at the start of the batch that begins at `step`, and a
# log of every checkpoint write asked of the run's checkpoint IO (upstream's SetupCallback saved through it too).
CTRL_C_PROBE = """
import os
import signal

from pytorch_lightning import Callback


class CtrlC(Callback):
    def __init__(self, hook, saves_log, step=0):
        self.hook, self.saves_log, self.step = hook, saves_log, step

    def on_fit_start(self, trainer, pl_module):
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def logged(checkpoint, path, storage_options=None):
            with open(self.saves_log, "a") as f:
                f.write(f"{os.path.basename(path)} {checkpoint['global_step']}\\n")
            save(checkpoint, path, storage_options)

        io.save_checkpoint = logged
        if self.hook == "on_fit_start":
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.hook == "on_train_batch_start" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
"""


def ctrl_c_args(tmp_path: Path, hook: str, step: int = 0) -> tuple[list[str], Path]:
    """Overrides that add the Ctrl-C probe, and the file its save log goes to."""
    (tmp_path / "ctrl_c_probe.py").write_text(CTRL_C_PROBE)
    log = tmp_path / "saves.log"
    return ["lightning.callbacks.ctrl_c.target=ctrl_c_probe.CtrlC", f"lightning.callbacks.ctrl_c.params.hook={hook}",
            f"lightning.callbacks.ctrl_c.params.saves_log={log}", f"lightning.callbacks.ctrl_c.params.step={step}"], log


def test_ctrl_c_while_a_run_resumes_leaves_last_ckpt_byte_identical(trained_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    before = digests(ckpts)
    probe, saves = ctrl_c_args(tmp_path, "on_fit_start")  # weights restored, step and optimizers not yet
    proc = run_main(["-r", str(run_dir), "-t", "lightning.trainer.max_steps=8", *probe], tmp_path / "unused",
                    extra_path=tmp_path)
    assert proc.returncode == 1, failed(proc)
    assert digests(ckpts) == before  # upstream's SetupCallback saved global_step 0 with empty Adam state here
    assert not saves.exists(), saves.read_text()
    out = proc.stdout + proc.stderr
    assert "RunGuard: training had not started (KeyboardInterrupt); no checkpoint written" in out, out[-3000:]


def test_ctrl_c_after_a_step_saves_once_through_the_run_guard_at_the_true_step(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    probe, saves = ctrl_c_args(tmp_path, "on_train_batch_start", step=2)  # during the batch that makes step 3
    proc = run_main([*TINY, "lightning.trainer.max_steps=200", *FAST, *probe], logs, extra_path=tmp_path)
    assert proc.returncode == 1, failed(proc)
    ckpt = only_run(logs) / "checkpoints" / "last.ckpt"
    assert saves.read_text().split("\n")[:-1] == ["last.ckpt 3"]  # one save (upstream's made a second, at step 2)
    assert load(ckpt)["global_step"] == 3
    assert all(s["state"] for s in load(ckpt)["optimizer_states"][:1])  # the trained state, Adam moments included
    out = proc.stdout + proc.stderr
    assert f"RunGuard: stopped at step 3 (Ctrl-C); last.ckpt holds step 3: resume from {ckpt}" in out, out[-3000:]
    assert "Summoning checkpoint" not in out


def test_diverged_run_stops_with_one_line_and_keeps_a_finite_checkpoint(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    proc = run_main([*TINY, "lightning.trainer.max_steps=40", "model.base_learning_rate=10",
                     "model.params.lossconfig.params.disc_start=0", *FAST,
                     "lightning.callbacks.run_guard.params.every_n_train_steps=1"], logs)
    assert proc.returncode == 1, failed(proc)
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("main.py: NonFiniteLossError:"), proc.stderr[-3000:]
    assert "step" in last_line and "model.base_learning_rate" in last_line
    assert "Traceback" not in proc.stderr
    ckpt = only_run(logs) / "checkpoints" / "last.ckpt"
    if ckpt.exists():  # an interval save from before the divergence: finite, never overwritten with NaN
        state = load(ckpt)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_resume_from_an_epoch_checkpoint_path(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    # 8 crops, batch 4: an epoch is 2 steps; the validation at its end writes epoch=000000.ckpt
    proc = run_main([*TINY, "lightning.trainer.max_steps=2", "data.params.train.params.length=8",
                     "data.params.validation.params.length=4"], logs)
    assert proc.returncode == 0, failed(proc)
    epoch_ckpt = only_run(logs) / "checkpoints" / "epoch=000000.ckpt"
    assert epoch_ckpt.is_file(), list(epoch_ckpt.parent.iterdir())
    resumed = run_main(["-r", str(epoch_ckpt), "-t", "lightning.trainer.max_steps=4"], logs)
    assert resumed.returncode == 0, failed(resumed)
    assert "RunGuard: training from step 2;" in resumed.stdout + resumed.stderr
    assert load(epoch_ckpt.parent / "last.ckpt")["global_step"] == 4


def test_moved_run_folder_resumes_into_its_own_last_ckpt(trained_run: Path, tmp_path: Path) -> None:
    moved = copy_run(trained_run, tmp_path / "elsewhere")
    proc = run_main(["-r", str(moved), "-t", "lightning.trainer.max_steps=6", *FAST], tmp_path / "unused")
    assert proc.returncode == 0, failed(proc)
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert not [n for n in names if "-v1" in n], names
    assert load(moved / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_gradient_accumulation_through_main(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    proc = run_main([*TINY, "--accumulate_grad_batches", "2", "lightning.trainer.max_steps=2", *FAST], logs)
    assert proc.returncode == 0, failed(proc)
    out = proc.stdout + proc.stderr
    assert "accumulate_grad_batches = 2" in out
    state = load(only_run(logs) / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 2
    batches = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert batches == 4  # two updates of two batches each


def test_misspelt_section_stops_before_training(tmp_path: Path) -> None:
    proc = run_main([*TINY, "lighting.trainer.max_steps=1"], tmp_path / "logs", timeout=120)
    assert proc.returncode != 0
    assert "unknown top-level config section(s) ['lighting']" in proc.stderr
    assert "Traceback" not in proc.stderr

