"""The real latent-diffusion main.py (patched) in a subprocess on CPU: train, checkpoint, resume, DDP, errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback

from conftest import LDM_TREE, ROOT, requires_ldm

pytestmark = [requires_ldm, pytest.mark.ldm, pytest.mark.slow]

MAIN = LDM_TREE / "main.py"
# Small and quick: 8 training crops, 4 validation crops, batch 4, logs every step, images every 2 steps.
FAST = ["data.params.train.params.length=8", "data.params.validation.params.length=4",
        "lightning.trainer.log_every_n_steps=1", "lightning.callbacks.image_logger.params.batch_frequency=2"]


class CodebookProbe(Callback):
    """Saves each rank's codebook and code counts at the end of training (used by the DDP test through the config)."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        torch.save({"codebook": pl_module.quantize.embedding.weight.detach().cpu(),
                    "world_size": trainer.world_size, "global_step": trainer.global_step},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def run_main(args: list[str], logdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("LDM_MAIN_RUN_TIME", None)
    proc = subprocess.run([sys.executable, str(MAIN), "-l", str(logdir), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def _logged_steps(run_dir: Path, version: str, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "testtube" / version))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tiny_config_trains_checkpoints_and_resumes_at_the_same_step(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    first = run_main(["--base", "configs/tiny_rot_vqgan.yaml", "-t", "lightning.trainer.max_steps=3", *FAST], logs)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (run_dir,) = list(logs.iterdir())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    assert {"quantize.embedding.weight", "loss.discriminator.main.0.weight"} <= set(state["state_dict"])
    assert list((run_dir / "images" / "train").glob("reconstructions_gs-000002_*.png"))
    assert list((run_dir / "configs").glob("*-project.yaml"))

    # -r <logdir>: configs and last.ckpt from the folder; one more step must continue from step 3
    second = run_main(["-r", str(run_dir), "-t", "lightning.trainer.max_steps=4", *FAST], logs)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Restored all states from the checkpoint" in second.stdout + second.stderr
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4
    assert _logged_steps(run_dir, "version_0", "train/rec_loss_step") == [0, 1, 2]
    assert _logged_steps(run_dir, "version_1", "train/rec_loss_step") == [3]

    # -n with -r: one line with a command going on in a new folder (patch 0024); that command does, from step 4
    named = run_main(["-n", "moved", "-r", str(run_dir), "-t"], logs, timeout=120)
    (line,) = [x for x in named.stderr.splitlines() if x.startswith("main.py: -n moved")]
    assert named.returncode == 1 and "Traceback" not in named.stderr, named.stderr[-2000:]
    command = line.split("drop -r: ", 1)[1].split()
    assert command[:2] == ["--base", f"{run_dir / 'configs'}/*.yaml"] and command[-1] == str(ckpt)
    configs = sorted(str(p) for p in (run_dir / "configs").glob("*.yaml"))
    third = run_main(["--base", *configs, *command[2:], "-t", "lightning.trainer.max_steps=5", *FAST], logs)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    (moved,) = [p for p in logs.iterdir() if p.name.endswith("_moved")]
    assert torch.load(moved / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 5
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4  # the first run untouched


def test_two_process_ddp_on_cpu_keeps_ranks_in_agreement(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    proc = run_main(["--base", "configs/tiny_rot_vqgan.yaml", "-t", "lightning.trainer.max_steps=2", *FAST,
                     "lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2",
                     "lightning.trainer.strategy=ddp_find_unused_parameters_true",
                     "lightning.callbacks.probe.target=test_ldm_main.CodebookProbe",
                     f"lightning.callbacks.probe.params.out_dir={probe}"], tmp_path / "logs", timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["global_step"] == r1["global_step"] == 2
    assert torch.equal(r0["codebook"], r1["codebook"])
    assert len(list((tmp_path / "logs").iterdir())) == 1  # both ranks wrote into one run folder


def test_missing_imagenet_root_is_one_clear_error(tmp_path: Path) -> None:
    env_root = os.environ.pop("IMAGENET_ROOT", None)
    try:
        proc = run_main(["--base", "configs/vqgan_64.yaml", "-t", "model.params.ddconfig.ch=32",
                         "model.params.lossconfig.params.perceptual_weight=0"], tmp_path / "logs")
    finally:
        if env_root is not None:
            os.environ["IMAGENET_ROOT"] = env_root
    assert proc.returncode != 0
    # found by the preflight check (adapters.runtime.preflight) before the model is built: one line, no traceback
    assert "main.py: no ImageNet root" in proc.stderr and "IMAGENET_ROOT" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "NameError" not in proc.stderr


def test_gpus_0_trains_on_the_cpu_at_the_scaled_learning_rate_and_says_what_it_means(tmp_path: Path) -> None:
    """`--gpus 0` is Lightning's count of no GPUs: patch 0014 once counted it as 0 devices (learning rate 0)."""
    proc = run_main(["--base", "configs/tiny_rot_vqgan.yaml", "-t", "--gpus", "0", "lightning.trainer.max_steps=1",
                     *FAST], tmp_path / "logs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Setting learning rate to 4.00e-04 = 1 (accumulate_grad_batches) * 1 (num_gpus) * 4 (batchsize)" in proc.stdout
    assert "Running on GPUs" not in proc.stdout
    (note,) = [line for line in proc.stderr.splitlines() if line.startswith("main.py: --gpus 0 ")]
    assert "no GPU" in note and "trains on the CPU" in note and "--gpus 0, " in note


def test_a_run_shorter_than_an_epoch_validates_at_its_last_step(tmp_path: Path) -> None:
    """400 training crops at batch 4: an epoch is 100 steps, so a 2-step run never validated (no images/val/, and
    ModelCheckpoint warned that its monitor val/rec_loss was missing, listing every metric). Patch 0020."""
    logs = tmp_path / "logs"
    proc = run_main(["--base", "configs/tiny_rot_vqgan.yaml", "-t", "lightning.trainer.max_steps=2",
                     "data.params.validation.params.length=4"], logs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = logs.iterdir()
    assert list((run / "images" / "val").glob("reconstructions_gs-000002_*.png"))
    assert (run / "checkpoints" / "epoch=000000.ckpt").is_file()  # saved as best by val/rec_loss: it had a value
    assert "could not find the monitored key" not in proc.stdout + proc.stderr


def _fake_run(logs: Path, with_checkpoint: bool) -> Path:
    run = logs / "2026-01-01T00-00-00_tiny_rot_vqgan"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "2026-01-01T00-00-00-project.yaml").write_text((ROOT / "configs" / "tiny_rot_vqgan.yaml").read_text())
    (run / "checkpoints").mkdir()
    if with_checkpoint:
        (run / "checkpoints" / "epoch=000000.ckpt").write_bytes(b"")
    return run


@pytest.mark.parametrize("case, expect", [
    ("trainer_key", "lightning.trainer.max_step is not a Lightning Trainer option (did you mean max_steps?)"),
    ("base", "--base configs/tiny_rot_vqgn.yaml: no such file (did you mean configs/tiny_rot_vqgan.yaml?)"),
    ("resume_missing", "no such run folder or checkpoint; the newest run in"),
    ("resume_logs", "holds runs but is not one: give a run folder, e.g. -r"),
    ("resume_empty_folder", "is not a run folder of main.py"),
    ("resume_no_last", "checkpoints/last.ckpt does not exist (resume from one of its checkpoints, e.g. -r"),
])
def test_command_line_mistakes_end_in_one_line_before_anything_is_built(case: str, expect: str,
                                                                         tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run = _fake_run(logs, with_checkpoint=True)
    (tmp_path / "empty").mkdir()
    args = {"trainer_key": ["--base", "configs/tiny_rot_vqgan.yaml", "-t", "lightning.trainer.max_step=60"],
            "base": ["--base", "configs/tiny_rot_vqgn.yaml", "-t"],
            "resume_missing": ["-r", str(tmp_path / "no_such_run"), "-t"],
            "resume_logs": ["-r", f"{logs}/", "-t"],
            "resume_empty_folder": ["-r", str(tmp_path / "empty"), "-t"],
            "resume_no_last": ["-r", str(run), "-t"]}[case]
    proc = run_main(args, logs, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("main.py: ")]
    assert len(lines) == 2 and expect in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Working with z of shape" not in proc.stdout  # nothing built


@pytest.mark.parametrize("trainer_config, devices", [
    ({}, 1), ({"gpus": "0"}, 1), ({"gpus": 0}, 1), ({"gpus": None}, 1), ({"gpus": "0,"}, 1), ({"gpus": "1,"}, 1),
    ({"gpus": "0,1,2,3"}, 4), ({"gpus": "2"}, 2), ({"gpus": "0,1", "num_nodes": 2}, 4), ({"num_nodes": 2}, 2)])
def test_the_learning_rate_counts_the_devices_of_the_run_and_one_for_a_cpu_run(trainer_config: dict,
                                                                                devices: int) -> None:
    assert _load_main().devices_for_lr_scaling(trainer_config) == devices


def _load_main():  # type: ignore[no-untyped-def]
    import importlib.util
    # by path, under its own name: enhancing-transformers also has a top-level `main`
    spec = importlib.util.spec_from_file_location("ldm_main_under_test", MAIN)
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    return main


@pytest.mark.parametrize("trainer_config, expect", [
    ({}, {"accelerator": "cpu"}),
    ({"gpus": "0,"}, {"accelerator": "gpu", "devices": [0]}),
    ({"gpus": "1,"}, {"accelerator": "gpu", "devices": [1]}),
    ({"gpus": "0,1,2,3"}, {"accelerator": "gpu", "devices": [0, 1, 2, 3],
                           "strategy": "ddp_find_unused_parameters_true"}),
    ({"gpus": "2"}, {"accelerator": "gpu", "devices": 2, "strategy": "ddp_find_unused_parameters_true"}),
    ({"gpus": "0,", "num_nodes": 2}, {"accelerator": "gpu", "devices": [0], "num_nodes": 2,
                                      "strategy": "ddp_find_unused_parameters_true"}),
    ({"gpus": "0,1", "strategy": "ddp"}, {"accelerator": "gpu", "devices": [0, 1], "strategy": "ddp"}),
    ({"resume_from_checkpoint": "x.ckpt", "max_steps": 5}, {"accelerator": "cpu", "max_steps": 5}),
])
def test_lightning1_trainer_options_translate(trainer_config: dict, expect: dict) -> None:
    assert _load_main().lightning2_trainer_kwargs(trainer_config) == expect
