"""adapters.runtime.preflight: what a user must fix is found before the model is built, one line each, all at once."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from adapters.runtime import preflight
from conftest import ENHANCING_TREE, LDM_TREE, ROOT, requires_enhancing, requires_ldm

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


def test_gpus_0_is_said_to_be_a_cpu_run_not_gpu_0(capsys: pytest.CaptureFixture[str]) -> None:
    for gpus in ("0", 0, " 0 "):
        (note,) = preflight.gpu_notes({"gpus": gpus})
        assert note.startswith("--gpus 0 means no GPU") and "trains on the CPU" in note and "--gpus 0, " in note
    for trainer in ({}, {"gpus": "0,"}, {"gpus": "1"}, {"gpus": None}):
        assert preflight.gpu_notes(trainer) == []
    preflight.exit_on_problems(OmegaConf.load(CONFIGS / "tiny_rot_vqgan.yaml"), {"gpus": "0"})  # a note, no exit
    assert capsys.readouterr().err.startswith("main.py: --gpus 0 means no GPU")


def test_trainer_options_lightning_does_not_take() -> None:
    (line,) = preflight.trainer_problems({"max_step": 60, "max_epochs": 1})
    assert line == "lightning.trainer.max_step is not a Lightning Trainer option (did you mean max_steps?): fix the spelling"
    (line,) = preflight.trainer_problems({"frobnicate": 1})
    assert "frobnicate is not a Lightning Trainer option: fix" in line
    # main.py's own flags (patch 0003 translates the Lightning 1.x ones) and every shipped config's trainer options
    flags = {"gpus": "0,", "num_nodes": 1, "max_epochs": None, "max_steps": -1, "accumulate_grad_batches": 1,
             "precision": None, "resume_from_checkpoint": None}
    assert preflight.trainer_problems(flags) == []
    for path in sorted(CONFIGS.glob("*.yaml")):
        trainer = OmegaConf.load(path).get("lightning", {}).get("trainer", {})
        assert preflight.trainer_problems(trainer) == [], path.name


def test_base_config_and_resume_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert preflight.base_config_problems(["configs/tiny_rot_vqgan.yaml"]) == []
    (line,) = preflight.base_config_problems(["configs/tiny_rot_vqgn.yaml"])
    assert line == "--base configs/tiny_rot_vqgn.yaml: no such file (did you mean configs/tiny_rot_vqgan.yaml?)"
    (line,) = preflight.base_config_problems([str(tmp_path / "nowhere" / "x.yaml")])
    assert "no such file" in line and "holds no configs" in line
    logs = tmp_path / "logs"
    assert preflight.resume_problems("", str(logs)) == []
    (line,) = preflight.resume_problems(str(logs), str(logs))
    assert line == f"-r {logs}: no such run folder or checkpoint"
    runs = [logs / f"2026-01-0{d}T00-00-00_tiny" for d in (1, 2)]
    for run in runs:
        (run / "configs").mkdir(parents=True)
        (run / "configs" / "a-project.yaml").write_text("model: {}\n")
        (run / "checkpoints").mkdir()
    (line,) = preflight.resume_problems(str(logs / "typo"), str(logs))
    assert line.endswith(f"no such run folder or checkpoint; the newest run in {logs}/ is {runs[1]}")
    (line,) = preflight.resume_problems(f"{logs}/", str(logs))
    assert line == f"-r {logs}/ holds runs but is not one: give a run folder, e.g. -r {runs[1]} (the newest)"
    (line,) = preflight.resume_problems(str(runs[0]), str(logs))
    assert f"{runs[0] / 'checkpoints' / 'last.ckpt'} does not exist (it saved no checkpoint" in line
    (runs[0] / "checkpoints" / "crash.ckpt").write_bytes(b"")  # never offered: resumed from only when asked
    assert "it saved no checkpoint" in preflight.resume_problems(str(runs[0]), str(logs))[0]
    (runs[0] / "checkpoints" / "epoch=000000.ckpt").write_bytes(b"")
    (line,) = preflight.resume_problems(str(runs[0]), str(logs))
    assert f"(resume from one of its checkpoints, e.g. -r {runs[0] / 'checkpoints' / 'epoch=000000.ckpt'})" in line
    (runs[0] / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert preflight.resume_problems(str(runs[0]), str(logs)) == []
    assert preflight.resume_problems(str(runs[0] / "checkpoints" / "epoch=000000.ckpt"), str(logs)) == []
    stray = tmp_path / "stray.ckpt"
    stray.write_bytes(b"")
    (line,) = preflight.resume_problems(str(stray), str(logs))
    assert line.startswith(f"-r {stray} is not a checkpoint in <run>/checkpoints/")
    with pytest.raises(SystemExit) as exit_:
        preflight.exit_on_command_line_problems(["configs/tiny_rot_vqgn.yaml"], str(logs / "typo"), str(logs))
    assert exit_.value.code == 1


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
    from adapters.integrations.losses import lpips_weight_paths

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


# --- enhancing-transformers' main.py (patch 11): the same checks, each line with the command that fixes it ---------
PAPER_ARGS = ["-c", "rot_vitvqgan_small", "-ng", "1"]


def test_enhancing_gpu_line_gives_the_cpu_command(no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    (line,) = preflight.enhancing_gpu_problems(1, PAPER_ARGS)
    assert line.startswith("-ng 1 asks for a GPU but torch sees none")
    assert "`python third_party/enhancing-transformers/main.py -c rot_vitvqgan_small -ng 0`" in line
    assert preflight.enhancing_gpu_problems(0, ["-c", "x", "-ng", "0"]) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    (line,) = preflight.enhancing_gpu_problems(4, ["-c", "x", "--num_gpus=4", "-e", "3"])
    assert "sees 2" in line and "main.py -c x --num_gpus 2 -e 3`" in line
    assert preflight.enhancing_gpu_problems(2, ["-c", "x", "-ng", "2"]) == []


def test_with_option_replaces_or_appends() -> None:
    names = ("-ng", "--num_gpus")
    assert preflight.with_option(["-c", "a", "-ng", "2"], names, "0") == ["-c", "a", "-ng", "0"]
    assert preflight.with_option(["-c", "a"], names, "0") == ["-c", "a", "-ng", "0"]  # upstream's default is 1


@requires_enhancing
@pytest.mark.enhancing
def test_enhancing_data_and_vgg_lines(no_weights: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = OmegaConf.load(CONFIGS / "rot_vitvqgan_small.yaml")
    (data,) = preflight.data_problems(config.dataset, section="dataset")  # train and validation: one line
    assert data.startswith("no ImageNet root: `export IMAGENET_ROOT=/path/to/imagenet`")
    assert "dataset.params.<split>.params.root" in data
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    monkeypatch.setenv("IMAGENET_ROOT", str(tmp_path / "imagenet"))
    (data,) = preflight.data_problems(config.dataset, section="dataset")  # enhancing's classes: val for validation
    assert str(tmp_path / "imagenet" / "val") in data and "`export IMAGENET_ROOT=" in data
    (vgg,) = preflight.enhancing_lpips_problems(config.model, "rot_vitvqgan_small")
    from adapters.integrations.losses import VGG16_FILE, VGG16_URL, lpips_weight_paths

    path = lpips_weight_paths()[VGG16_FILE]
    assert f"`mkdir -p {path.parent} && curl -L -o {path} {VGG16_URL}`" in vgg
    assert "perceptual_weight: 0 in configs/rot_vitvqgan_small.yaml" in vgg
    config.model.params.loss.params.perceptual_weight = 0.0
    assert preflight.enhancing_lpips_problems(config.model) == []
    config.model.params.loss.target = "enhancing.losses.vqperceptual.VQLPIPSWithDiscriminator"  # builds LPIPS anyway
    assert len(preflight.enhancing_lpips_problems(config.model)) == 1
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert preflight.enhancing_lpips_problems(config.model) == []


@requires_enhancing
@pytest.mark.enhancing
def test_vitvqgan_paper_command_on_a_cpu_machine_says_all_three_in_30_s(tmp_path: Path) -> None:
    """README/docs: `python third_party/enhancing-transformers/main.py -c rot_vitvqgan_small -ng 1` without a GPU,
    ImageNet or the VGG16 weights: exit 1 within 30 s, no traceback, one line per missing piece with its command."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", TORCH_HOME=str(tmp_path / "torch_home"),
               ROTATION_TRICK_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("IMAGENET_ROOT", None)
    start = time.monotonic()
    res = subprocess.run([sys.executable, str(ENHANCING_TREE / "main.py"), *PAPER_ARGS, "-o", str(tmp_path / "runs")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Experiment config" not in res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("main.py: ")]
    assert len(lines) == 4, res.stderr[-3000:]  # three problems and the count
    assert "-ng 1 asks for a GPU" in lines[0] and f"-ng 0 -o {tmp_path / 'runs'}`" in lines[0]  # the user's own command
    assert "no ImageNet root: `export IMAGENET_ROOT=" in lines[1]
    assert "vgg16-397923af.pth" in lines[2] and "curl -L -o" in lines[2]
    assert lines[3].startswith("main.py: 3 problem(s) above; nothing was built")
    assert "-c tiny_rot_vitvqgan -lr 3e-4 -e 30 -ng 0 -l csv`" in lines[3]  # the smoke run docs/vitvqgan.md gives
    assert not (tmp_path / "runs").exists()  # no run folder: nothing was built
    # The 30 s target holds on an idle machine (7 s of CPU time, nearly all of it importing torch and Lightning);
    # a machine busier than its cores stretches wall time by about load/cores.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    allowed = 30.0 * max(1.0, os.getloadavg()[0] / cores)
    assert took <= allowed, f"took {took:.1f} s (allowed {allowed:.0f} s at this load)"
    print(f"enhancing preflight exit after {took:.1f} s")


@requires_enhancing
@pytest.mark.enhancing
def test_vitvqgan_missing_config_is_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ENHANCING_TREE / "main.py"), "-c", "rot_vitvqgan_smal", "-ng", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    (line,) = [line for line in res.stderr.splitlines() if line.startswith("main.py: ")]
    assert line.startswith("main.py: configs/rot_vitvqgan_smal.yaml not found (configs here: ")
    assert "rot_vitvqgan_small" in line


def test_a_name_with_resume_is_one_line_with_the_command_for_a_new_folder(tmp_path: Path) -> None:
    run = tmp_path / "logs" / "2026-01-01T00-00-00_tiny"
    assert preflight.name_problems("", str(run)) == [] and preflight.name_problems("x", "") == []
    (line,) = preflight.name_problems("x", str(run))
    assert line.startswith(f"-n x with -r {run}: -r goes on in the run's own folder")
    assert line.endswith(f"--base {run}/configs/*.yaml -n x --resume_from_checkpoint {run}/checkpoints/last.ckpt")
    ckpt = run / "checkpoints" / "epoch=000001.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    (line,) = preflight.name_problems("x", str(ckpt))  # -r a checkpoint: its run's configs, that checkpoint
    assert f"--base {run}/configs/*.yaml" in line and line.endswith(f"--resume_from_checkpoint {ckpt}")
