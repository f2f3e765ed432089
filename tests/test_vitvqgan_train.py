"""The tiny ViT-VQGAN config trains, resumes and runs 2-process DDP (gloo) through the real patched main.py on CPU."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ENHANCING_TREE, ROOT, requires_enhancing

pytestmark = [requires_enhancing, pytest.mark.slow]
MAIN = ENHANCING_TREE / "main.py"
TINY = OmegaConf.load(ROOT / "configs" / "tiny_rot_vitvqgan.yaml")
BATCH = TINY.dataset.params.batch_size
TINY_STEPS_PER_EPOCH = TINY.dataset.params.train.params.length // BATCH  # 512 photo crops per epoch, batch 16: 32
TOKENS = (TINY.model.params.image_size // TINY.model.params.patch_size) ** 2  # 16x16 images, patch 2: 64


def run_main(args: list[str], cwd: Path, run_id: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENHANCING_RUN_ID": run_id, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ENHANCING_NO_CUDA_OPS": "1"}
    r = subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"main.py {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "log" / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict[str, str]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key)]
    assert values, f"{key} was never logged"
    return values[-1]


def test_tiny_config_trains_and_resumes_through_main(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    common = ["-c", "tiny_rot_vitvqgan", "-lr", "1e-4", "-ng", "0", "-l", "csv", "-b", "4", "-o", str(out)]
    run_main([*common, "-e", "1"], cwd=ROOT, run_id="first")
    first = out / "tiny_rot_vitvqgan" / "first"
    ckpt0 = first / "ckpt" / "tiny_rot_vitvqgan-epoch=00.ckpt"
    assert ckpt0.is_file()
    state0 = torch.load(ckpt0, map_location="cpu", weights_only=False)
    # One global step per batch as under Lightning 1.5 (not one per optimizer), both optimizers saved.
    assert state0["global_step"] == TINY_STEPS_PER_EPOCH and len(state0["optimizer_states"]) == 2
    rows = metrics(first)
    for key in ("train/total_loss_epoch", "train/disc_loss_epoch", "train/rec_loss_epoch", "val/rec_loss_epoch",
                "train/codebook_usage_epoch", "train/codebook_usage_total", "val/codebook_usage_total",
                "train/quant_error_total", "val/quant_error"):
        assert 0 <= last_value(rows, key) < 1e3, key
    assert 0 < last_value(rows, "train/codebook_usage_total") <= 1
    pictures = {p.name.split("_gs-")[0] for p in (first / "log" / "results" / "train").glob("*.png")}
    assert pictures == {"originals", "reconstructions", "codebook_usage"}

    # Resume for a second epoch, accumulating gradients over 2 batches (-u 2): half as many optimizer steps.
    run_main([*common, "-e", "2", "-u", "2", "-r", str(ckpt0)], cwd=ROOT, run_id="second")
    ckpt1 = out / "tiny_rot_vitvqgan" / "second" / "ckpt" / "tiny_rot_vitvqgan-epoch=01.ckpt"
    state1 = torch.load(ckpt1, map_location="cpu", weights_only=False)
    assert state1["epoch"] == 1 and state1["global_step"] == TINY_STEPS_PER_EPOCH + TINY_STEPS_PER_EPOCH // 2
    w0 = state0["state_dict"]["quantizer.embedding.weight"]
    w1 = state1["state_dict"]["quantizer.embedding.weight"]
    assert w0.shape == w1.shape and not torch.equal(w0, w1)
    assert not (out / "tiny_rot_vitvqgan" / "second" / "ckpt" / "tiny_rot_vitvqgan-epoch=00.ckpt").exists()


PROBE = '''
import json
import torch
from adapters.integrations.vitvqgan import RotationViTVQ


class ProbeViTVQ(RotationViTVQ):
    """Records, per rank, the codes its own training forwards chose, and the statistics the model computes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []
        self.quantizer.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        if module.training and module.track_stats:
            self.seen.append(output[2].flatten().cpu())

    def on_train_epoch_end(self):
        local = self.code_stats.code_counts.clone()
        total = self.code_stats.compute(reset=False)["code_counts"]  # all ranks call it: it all-reduces
        expected = torch.bincount(torch.cat(self.seen), minlength=local.numel())
        with open(f"probe_rank{self.global_rank}.json", "w") as f:
            json.dump({"local": local.tolist(), "expected": expected.tolist(), "total": total.tolist(),
                       "world": self.trainer.world_size}, f)
        super().on_train_epoch_end()
'''


def test_two_process_ddp_on_cpu_keeps_per_rank_statistics(tmp_path: Path) -> None:
    """-ng 0 -np 2: DDP over gloo trains; each rank's code histogram is its own (DDP does not overwrite it from
    rank 0) and the epoch statistics are the sum over ranks."""
    (tmp_path / "configs").mkdir()
    cfg = (ROOT / "configs" / "tiny_rot_vitvqgan.yaml").read_text()
    cfg = cfg.replace("target: adapters.integrations.vitvqgan.RotationViTVQ", "target: ddp_probe.ProbeViTVQ")
    assert "ddp_probe.ProbeViTVQ" in cfg
    (tmp_path / "configs" / "probe.yaml").write_text(cfg)
    (tmp_path / "ddp_probe.py").write_text(PROBE)
    run_main(["-c", "probe", "-lr", "1e-4", "-e", "1", "-ng", "0", "-np", "2", "-l", "csv", "-b", "4"],
             cwd=tmp_path, run_id="ddp")
    probes = [json.loads((tmp_path / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(p["world"] == 2 for p in probes)
    for p in probes:
        assert p["local"] == p["expected"]
        # DistributedSampler splits the crops: half the epoch's batches per rank, BATCH images x TOKENS each.
        assert sum(p["local"]) == TINY_STEPS_PER_EPOCH // 2 * BATCH * TOKENS
    summed = [a + b for a, b in zip(probes[0]["local"], probes[1]["local"])]
    assert probes[0]["total"] == summed and probes[1]["total"] == summed
    run_dirs = list((tmp_path / "experiments" / "probe").iterdir())
    assert [d.name for d in run_dirs] == ["ddp"]  # both processes wrote to one run directory
    assert (run_dirs[0] / "ckpt" / "probe-epoch=00.ckpt").is_file()


@pytest.mark.longrun
def test_vitvqgan_sigterm_saves_last_ckpt_and_exits_zero_then_resumes(tmp_path: Path) -> None:
    """enhancing-transformers' main.py (patched) gets the same RunGuard: interval saves and a save on SIGTERM."""
    out, log = tmp_path / "runs", tmp_path / "vit.log"
    env = {**os.environ, "ENHANCING_RUN_ID": "r", "ENHANCING_NO_CUDA_OPS": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = ["-c", "tiny_rot_vitvqgan", "-lr", "1e-4", "-ng", "0", "-l", "csv", "-b", "1000", "-o", str(out)]
    ckpt = out / "tiny_rot_vitvqgan" / "r" / "ckpt" / "last.ckpt"
    with log.open("w") as f:
        # TINY_STEPS_PER_EPOCH (32) steps per epoch and last.ckpt every run_guard.every_n_train_steps (100) steps in
        # the tiny config, so the first save here is SIGTERM's
        proc = subprocess.Popen([sys.executable, str(ENHANCING_TREE / "main.py"), *common, "-e", "100"], cwd=ROOT,
                                env=env, stdout=f, stderr=subprocess.STDOUT)
    end = time.time() + 240
    while "Epoch 1" not in log.read_text() and time.time() < end:  # into the second epoch
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)  # written by this test
    assert state["global_step"] > TINY_STEPS_PER_EPOCH and len(state["optimizer_states"]) == 2
    resumed = subprocess.run([sys.executable, str(ENHANCING_TREE / "main.py"), *common, "-e", "3", "-r", str(ckpt)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"RunGuard: training from step {state['global_step']};" in resumed.stdout + resumed.stderr
