"""The README's main job (latent-diffusion main.py, configs/tiny_rot_vqgan.yaml) is quiet and ends saying where to
look: no "pop from empty list", no Lightning warnings caused by the project's code, no YAML dumps; validation images
are written; the last lines name the images and the checkpoint. Plus the pieces behind it (adapters.runtime.console)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.evaluation.codebook_logging import usage_figure
from adapters.runtime.console import CpuThreads, auto_threads, run_summary
from conftest import LDM_TREE, ROOT, requires_ldm

NOISE = ["pop from empty list", "Trying to infer the `batch_size`", "in eval mode", "LeafSpec", "Traceback",
         "Project config", "Merged modelckpt-cfg", "GPU available", "Tip:", "Warning", "warn",
         "weights_only"]  # Lightning's "`weights_only` was not set" at every RunGuard save


@requires_ldm
@pytest.mark.ldm
@pytest.mark.slow
def test_main_job_is_quiet_writes_val_images_and_says_where_to_look(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("OMP_NUM_THREADS", None)  # the config's CpuThreads chooses
    # train images at steps 1, 2, 4, then every 4: upstream printed "pop from empty list" at step 8; validation
    # every 2 steps: upstream wrote val images only where the step fitted that schedule, never at step 10
    args = ["--base", "configs/tiny_rot_vqgan.yaml", "-t", "lightning.trainer.max_steps=10",
            "data.params.train.params.length=8", "data.params.validation.params.length=4",
            "lightning.callbacks.image_logger.params.batch_frequency=4", "lightning.trainer.log_every_n_steps=1",
            "lightning.callbacks.run_guard.params.every_n_train_steps=5"]  # RunGuard saves last.ckpt at 5 and 10
    res = subprocess.run([sys.executable, str(LDM_TREE / "main.py"), "-l", str(tmp_path / "logs"), *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    found = [n for n in NOISE if n.lower() in out.lower()]
    assert not found, f"noise on the console: {found}\n{out[-3000:]}"
    lines = [line for line in re.split(r"[\r\n]", out) if line.strip() and "it/s" not in line and "[A" not in line]
    assert len(lines) <= 30, "\n".join(lines)
    assert any(line.startswith("CPU threads: ") for line in lines)
    (run,) = (tmp_path / "logs").iterdir()
    val = sorted(p.name for p in (run / "images" / "val").glob("*.png"))
    assert any(n.startswith("reconstructions_gs-000010") for n in val) and any(n.startswith("codebook_usage") for n in val)
    tail = out[out.index("Done. Run folder:"):]
    assert str(run) in tail and "images/val/reconstructions_gs-000010" in tail and "last.ckpt" in tail


def test_run_summary_names_the_latest_images_and_the_checkpoint(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        for step in (2, 10):
            for kind in ("inputs", "reconstructions", "codebook_usage"):
                (tmp_path / "images" / split / f"{kind}_gs-{step:06}_e-000000_b-000000.png").write_bytes(b"")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    text = "\n".join(run_summary(tmp_path))
    assert "images/val/reconstructions_gs-000010" in text and "gs-000002" not in text
    assert f"-r {tmp_path}" in text and "tensorboard --logdir" in text
    assert "checkpoint" not in "\n".join(run_summary(tmp_path / "empty"))


def test_auto_threads_leaves_busy_cores_alone() -> None:
    assert auto_threads(cores=2, load=0.1) == 2
    assert auto_threads(cores=2, load=2.0) == 1 and auto_threads(cores=2, load=7.5) == 1
    assert auto_threads(cores=16, load=4.0) == 12
    with pytest.raises(ValueError, match="threads must be 'auto' or a positive integer"):
        CpuThreads(threads=0)


def test_usage_figure_explains_itself() -> None:
    counts = torch.zeros(512, dtype=torch.long)
    counts[[0, 3, 100]] = torch.tensor([5, 1, 500])
    fig = usage_figure(counts, "Codebook usage, train, step 7", "this epoch")
    assert fig.dim() == 4 and fig.shape[:2] == (1, 3) and fig.shape[-1] > 600  # a figure, not one pixel per code
    assert 0.0 <= float(fig.min()) and float(fig.max()) <= 1.0
    # not a grey grid: the colour map (viridis) and the red marker of the used-code count are in it
    rgb = fig[0].reshape(3, -1)
    assert ((rgb[0] - rgb[2]).abs() > 0.3).any()
    empty = usage_figure(torch.zeros(64, dtype=torch.long))  # nothing counted yet: still a figure, no error
    assert empty.shape[1] == 3
