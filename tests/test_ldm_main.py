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
    import importlib.util
    # by path, under its own name: enhancing-transformers also has a top-level `main`
    spec = importlib.util.spec_from_file_location("ldm_main_under_test", MAIN)
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    assert main.lightning2_trainer_kwargs(trainer_config) == expect
