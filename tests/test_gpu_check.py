"""scripts/gpu_check.sh: its no-GPU line, its usage errors, the commands it would run on a GPU (configs, override
keys, the user's exact command), its offline data, and its summary, driven by a stand-in interpreter."""
from __future__ import annotations

import inspect
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
USER_COMMAND = "third_party/latent-diffusion/main.py --base configs/rot_vqgan_64.yaml -t --gpus 0,".split()


def run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_without_a_gpu_it_says_so_in_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    r = run(str(tmp_path / "out"), "99")  # GPU 99 exists nowhere, so this is the no-GPU path on any machine
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["gpu_check.sh: no CUDA GPU visible (GPU id 99, torch.cuda.is_available() is "
                                     "False): run it on a machine with one"]
    assert not (tmp_path / "out" / "gpu_check.md").exists()


@pytest.mark.parametrize("args", [(), ("a", "0", "extra"), ("--dry-run",), ("--dry-run", "a", "0"), ("-x",)])
def test_usage_errors_are_one_line(args: tuple[str, ...]) -> None:
    r = run(*args)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "usage: scripts/gpu_check.sh OUT_DIR [GPU_ID] | --dry-run OUT_DIR | --offline-data DIR"]


def test_gpu_id_must_be_an_index(tmp_path: Path) -> None:
    r = run(str(tmp_path), "cuda:0")
    assert r.returncode == 2 and r.stderr.strip() == "gpu_check.sh: GPU_ID must be a GPU index such as 0, got 'cuda:0'"


def dry_run_steps(out: Path) -> dict[str, list[str]]:
    r = run("--dry-run", str(out))
    assert r.returncode == 0, r.stderr
    steps = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    return {name: shlex.split(cmd) for name, cmd in steps.items()}


def test_dry_run_commands_point_at_real_configs_and_keys(tmp_path: Path) -> None:
    from omegaconf import OmegaConf
    from pytorch_lightning import Trainer

    steps = dry_run_steps(tmp_path)
    assert list(steps) == ["offline data", "cuda_tests", "bench_vq", "step_table3", "step_table4", "ldm_main"]
    assert steps["cuda_tests"][-2:] == ["tests/test_quantizer_cuda.py", "tests/test_quantizer_search.py"]
    bench = steps["bench_vq"]
    assert bench[1] == "scripts/bench_quantizer.py" and bench[bench.index("--device") + 1] == "cuda"
    assert "--methods" not in bench and "--shapes" not in bench  # all of them: fused, blocked, upstream, vqp

    for step, batch in (("step_table3", "16"), ("step_table4", "32")):
        words = steps[step]
        assert words[1] == "scripts/bench_train_step.py" and words[words.index("--batch-size") + 1] == batch
        configs = [ROOT / w for w in words if w.endswith(".yaml")]
        assert len(configs) == 2 and all(c.is_file() for c in configs)
        ste, rot = (OmegaConf.load(c) for c in configs)
        assert ste.model.params.get("gradient", "ste") == "ste" and rot.model.params.gradient == "rotation_released"
        for i, w in enumerate(words):
            if w == "-o":  # an override must name a key the config has (a typo would add a key nobody reads)
                key = words[i + 1].split("=")[0]
                assert all(OmegaConf.select(OmegaConf.load(c), key) is not None for c in configs), key

    main = steps["ldm_main"]
    at = main.index(USER_COMMAND[0])
    assert main[at:at + len(USER_COMMAND)] == USER_COMMAND, "the user's command, word for word"
    assert main[0] == "env" and f"IMAGENET_ROOT={tmp_path}/offline_imagenet" in main[:at]
    base = OmegaConf.load(ROOT / "configs" / "rot_vqgan_64.yaml")
    trainer_args = inspect.signature(Trainer.__init__).parameters
    overrides = [w for w in main[at + len(USER_COMMAND):] if "=" in w]
    assert "lightning.trainer.max_steps=40" in overrides
    for key in (o.split("=")[0] for o in overrides):
        if key.startswith("lightning.trainer."):
            assert key.rsplit(".", 1)[1] in trainer_args, key
        else:
            assert OmegaConf.select(base, key) is not None, key


def test_offline_data_is_an_imagenet_folder_the_configs_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    from adapters.evaluation.data import ImageNetTrain, ImageNetValidation

    r = run("--offline-data", str(tmp_path / "data"))
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("IMAGENET_ROOT", str(tmp_path / "data"))
    data = OmegaConf.load(ROOT / "configs" / "rot_vqgan_64.yaml").data.params  # root: null -> $IMAGENET_ROOT
    train, val = ImageNetTrain(**data.train.params), ImageNetValidation(**data.validation.params)
    assert (len(train), len(val)) == (192, 16)
    assert train[0]["image"].shape == (256, 256, 3) and val[15]["image"].shape == (256, 256, 3)
    assert train[0]["image"].min() >= -1 and train[0]["image"].max() <= 1


FAKE_PYTHON = r'''#!{python}
"""Stands in for the interpreter on a machine without a GPU: a CUDA device, canned step outputs; the script's
inline Python (offline data, targets, the LPIPS check) runs for real."""
import json, os, sys
from pathlib import Path

real, args = {python!r}, sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
if args[0] == "-c" and "is_available" in args[1]:
    sys.exit(0)
if args[0] == "-c" and "get_device_properties" in args[1]:
    print("FakeGPU, 80 GiB, CUDA 12.4")
    sys.exit(0)
if args[0] in ("-c", "-"):
    os.execv(real, [real, *args])
if args[:2] == ["-m", "pytest"]:
    print("30 passed in 12.0s")
    sys.exit(0)
if args[0].endswith("bench_quantizer.py"):
    times = {{"table3_64x64x3": dict(fused=0.001, upstream=0.004), "table3_32x32x4": dict(fused=0.001, upstream=0.0015)}}
    rows = [dict(shape=s, method=m, median_s=t) for s, by_method in times.items() for m, t in by_method.items()]
    Path(args[args.index("--json") + 1]).write_text(json.dumps(rows))
    print("| shape | method |\n|---|---|\n| table3_64x64x3 | ours, fused |")
    sys.exit(0)
if args[0].endswith("bench_train_step.py"):
    slow = "1.030" if "vitvqgan_small.yaml" in args[1] else "1.004"
    print("| config | gradient | median s/step | ratio | median of per-round ratios |\n|---|---|---|---|---|\n"
          f"| a.yaml | ste | 0.3000 | 1.000 | 1.000 |\n| b.yaml | rotation_released | 0.3100 | {{slow}} | {{slow}} |")
    sys.exit(0)
if args[0].endswith("main.py"):
    assert os.environ["IMAGENET_ROOT"] and len(list(Path(os.environ["IMAGENET_ROOT"]).rglob("*.JPEG"))) == 208
    if os.environ.get("FAKE_MAIN_FAILS"):
        print("RuntimeError: CUDA out of memory", file=sys.stderr)
        sys.exit(1)
    run = Path(args[args.index("-l") + 1]) / "2026-01-01T00-00-00_rot_vqgan_64"
    for f in ("checkpoints/last.ckpt", "images/train/reconstructions_gs-000032_e-000002_b-000008.png"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_text("x")
    sys.exit(0)
sys.exit(f"fake python: unexpected {{args}}")
'''


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    path = tmp_path / "fake_python"
    path.write_text(FAKE_PYTHON.format(python=sys.executable))
    path.chmod(0o755)
    return path


def test_gpu_run_writes_one_summary_with_every_step_and_the_targets(tmp_path: Path, fake_python: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "calls.jsonl"
    r = run(str(out), "0", env={"PYTHON": str(fake_python), "FAKE_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    summary = (out / "gpu_check.md").read_text()
    assert "- device: FakeGPU, 80 GiB, CUDA 12.4" in summary and "- command: `scripts/gpu_check.sh " in summary
    for step in ("cuda_tests", "bench_vq", "step_table3", "step_table4", "ldm_main"):
        assert f"\n## {step}: " in summary
    assert summary.count("\nexit 0, ") == 5
    assert "checkpoints: 1, training image grids: 1" in summary
    assert f"{' '.join(USER_COMMAND)} -l {out}/ldm_logs lightning.trainer.max_steps=40" in summary
    assert "- table3_64x64x3: fused 1.00 ms vs taming + released rotation 4.00 ms = 4.00x faster (target at least " \
           "2x): met" in summary
    assert "- table3_32x32x4: fused 1.00 ms vs taming + released rotation 1.50 ms = 1.50x faster (target at least " \
           "2x): missed" in summary
    assert "- step_table3: b.yaml 0.3100 s/step, 1.004x the straight-through step" in summary
    assert "(median of per-round ratios 1.030; target at most 1.01x): missed" in summary
    mains = [c for c in map(json.loads, log.read_text().splitlines()) if c[0].endswith("main.py")]
    assert len(mains) == 1 and mains[0][:len(USER_COMMAND)] == USER_COMMAND


def test_a_failing_step_is_reported_and_the_exit_is_non_zero(tmp_path: Path, fake_python: Path) -> None:
    out = tmp_path / "out"
    r = run(str(out), "0", env={"PYTHON": str(fake_python), "FAKE_LOG": str(tmp_path / "calls.jsonl"),
                                "FAKE_MAIN_FAILS": "1"})
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (f"gpu_check.sh: failed steps: ldm_main (see {out}/gpu_check.md and "
                                         f"{out}/<step>.err)")
    summary = (out / "gpu_check.md").read_text()
    assert summary.count("\nexit 0, ") == 4 and "\nexit 1, " in summary
    assert "RuntimeError: CUDA out of memory" in summary
