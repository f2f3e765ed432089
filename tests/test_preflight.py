"""adapters.preflight: what a user must fix first is found before the model is built, one line each, all at once."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from adapters import preflight
from conftest import LDM_TREE, ROOT, requires_ldm

CONFIGS = ROOT / "configs"


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("ROTATION_TRICK_OFFLINE", "1")  # no connection attempt
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)


def test_cpu_runs_and_the_tiny_config_have_no_problems(no_gpu: None) -> None:
    assert preflight.problems(OmegaConf.load(CONFIGS / "tiny_rot_vqgan.yaml"), {}) == []


def test_gpus_asked_for_but_absent_or_too_few(no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    (line,) = preflight.gpu_problems({"gpus": "0,"})
    assert "--gpus 0, asks for a GPU but torch sees none" in line and "drop --gpus" in line
    assert preflight.gpu_problems({"gpus": "0"}) == []  # upstream's "0" means CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert preflight.gpu_problems({"gpus": "0,1"}) == [] and preflight.gpu_problems({"gpus": 2}) == []
    (line,) = preflight.gpu_problems({"gpus": "0,1,2,3"})
    assert "[2, 3]" in line and "sees 2" in line


def test_imagenet_root_missing_or_without_split(no_weights: None, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = OmegaConf.load(CONFIGS / "rot_vqgan_64.yaml").data
    (line,) = preflight.data_problems(data)  # train and validation share the root: said once
    assert "no ImageNet root" in line and "IMAGENET_ROOT" in line
    (tmp_path / "imagenet" / "train" / "n01440764").mkdir(parents=True)
    monkeypatch.setenv("IMAGENET_ROOT", str(tmp_path / "imagenet"))
    (line,) = preflight.data_problems(data)
    assert str(tmp_path / "imagenet" / "val") in line and "does not exist" in line
    (tmp_path / "imagenet" / "val").mkdir()
    assert preflight.data_problems(data) == []


def test_lpips_weights_missing_names_files_and_the_override_that_works(no_weights: None, tmp_path: Path) -> None:
    model = OmegaConf.load(CONFIGS / "rot_vqgan_64.yaml").model
    (line,) = preflight.lpips_problems(model)
    assert "vgg16-397923af.pth" in line and "vgg.pth" in line
    assert "model.params.lossconfig.params.perceptual_weight=0" in line
    from adapters.losses import lpips_weight_paths

    for path in lpips_weight_paths().values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert preflight.lpips_problems(model) == []
    model.params.lossconfig.params.perceptual_weight = 0.0
    assert preflight.lpips_problems(model) == []


@requires_ldm
@pytest.mark.ldm
def test_paper_command_without_gpu_data_or_weights_says_all_three_before_building(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", TORCH_HOME=str(tmp_path / "torch_home"),
               ROTATION_TRICK_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("IMAGENET_ROOT", None)
    start = time.monotonic()
    res = subprocess.run([sys.executable, str(LDM_TREE / "main.py"), "-l", str(tmp_path / "logs"), "--base",
                          "configs/rot_vqgan_64.yaml", "-t", "--gpus", "0,"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert res.returncode == 1, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("main.py: ")]
    assert len(lines) == 4, res.stderr[-3000:]  # three problems and the count
    assert "asks for a GPU" in lines[0] and "no ImageNet root" in lines[1]
    assert "model.params.lossconfig.params.perceptual_weight=0" in lines[2] and "3 problem(s)" in lines[3]
    assert "Traceback" not in res.stderr and "Running on GPUs" not in res.stdout
    assert "Working with z of shape" not in res.stdout  # the model was never built
    assert not (tmp_path / "logs").exists()
    print(f"preflight exit after {took:.1f} s")
