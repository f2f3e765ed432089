"""A tiny random diffusers ``VQModel`` (no downloads) swapped by ``adapters.swap_quantizers``, and the training script."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from adapters import swap_quantizers
from adapters.integrations.swap import DiffusersRotationQuantizer
from conftest import ROOT

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed (an optional extra): pip install -e '.[diffusers]' to run these")
SCRIPT = ROOT / "scripts" / "train_diffusers_vq.py"


def tiny_vqmodel() -> Any:
    """A random diffusers VQModel: 16 px in, 8 px latents of 4 channels, 32 codes of dim 4."""
    torch.manual_seed(0)
    model = diffusers.VQModel(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                              block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4,
                              vq_embed_dim=4, num_vq_embeddings=32, sample_size=16)
    with torch.no_grad():  # codes at the encoder's scale: many used, so the estimators' gradients differ visibly
        model.quantize.embedding.weight.normal_(std=0.5)
    return model


def _step(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reconstruction, commit loss, encoder conv_in weight gradient) of one forward/backward."""
    model.zero_grad()
    out = model(x)
    (out.sample.square().mean() + out.commit_loss).backward()
    return out.sample.detach(), out.commit_loss.detach(), model.encoder.conv_in.weight.grad.clone()


def test_ste_is_diffusers_bit_for_bit_and_rotation_changes_the_encoder_gradient() -> None:
    original = tiny_vqmodel()
    ste, rotated = copy.deepcopy(original), copy.deepcopy(original)
    keys = list(original.state_dict())
    assert swap_quantizers(ste, gradient="ste", search="blocked") == ["quantize"]
    assert swap_quantizers(rotated, gradient="rotation_released", search="blocked") == ["quantize"]
    for model in (ste, rotated):
        q = model.quantize
        assert type(q) is DiffusersRotationQuantizer and list(model.state_dict()) == keys
        assert (q.n_e, q.vq_embed_dim, q.e_dim, q.beta, q.legacy) == (32, 4, 4, 0.25, True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = _step(original, x)
    got = _step(ste, x)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-7)
    rot = _step(rotated, x)
    torch.testing.assert_close(rot[0], ref[0], rtol=1e-4, atol=1e-5)  # q up to the rotation's float rounding
    torch.testing.assert_close(rot[1], ref[1])
    assert not torch.allclose(rot[2], ref[2], rtol=1e-3, atol=1e-6)
    # diffusers' other entry points still work on the swapped quantizer
    latents = ste.encode(x).latents
    torch.testing.assert_close(ste.decode(latents).sample, got[0])
    _, _, (_, _, idx) = ste.quantize(latents)
    entry = ste.quantize.get_codebook_entry(idx, (2, 8, 8, 4))
    torch.testing.assert_close(entry, original.quantize.get_codebook_entry(idx, (2, 8, 8, 4)))


def test_save_pretrained_loads_back_with_plain_diffusers(tmp_path: Path) -> None:
    model = tiny_vqmodel()
    swap_quantizers(model, gradient="rotation_released", search="blocked")
    with torch.no_grad():
        model.quantize.embedding.weight.add_(0.1)  # trained weights must be what is saved
    model.save_pretrained(tmp_path / "model")
    loaded = diffusers.VQModel.from_pretrained(tmp_path / "model")
    assert type(loaded.quantize).__module__ == "diffusers.models.autoencoders.vae"
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).sample, model.eval()(x).sample)
    # a process that never imports the project loads it as well
    code = ("import sys, diffusers; m = diffusers.VQModel.from_pretrained(sys.argv[1]); "
            "assert not any(n == 'adapters' or n.startswith('adapters.') for n in sys.modules); print(m.config.num_vq_embeddings)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model")], capture_output=True, text=True,
                       cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "32", r.stderr[-2000:]


def test_training_script_trains_logs_saves_images_and_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--config", "tiny", "--steps", "4",
                        "--batch-size", "2", "--size", "16", "--log-every", "2", "--image-every", "4",
                        "--val-images", "2", "--search", "blocked"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "quantize -> DiffusersRotationQuantizer (gradient rotation_released" in r.stdout
    assert "Traceback" not in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert {"train/loss", "train/codebook_usage", "train/perplexity", "train/quant_error",
                "train/dead_codes"} <= set(row)
    assert "val/psnr" in rows[-1] and "val/codebook_usage" in rows[-1]
    assert (out / "images" / "recon_000004.png").is_file()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert f"model: {out / 'model'}" in r.stdout and "step 2: loss " in r.stdout
    loaded = diffusers.VQModel.from_pretrained(out / "model")
    assert loaded.config.num_vq_embeddings == 32


def test_training_script_refuses_a_missing_config_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--config", "nope.json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "train_diffusers_vq.py: --config 'nope.json' is neither small nor tiny nor a config.json file"


# --------------------------------------------------------------------------------------------------------------
# The training script's run folder: checkpoints, --resume, --overwrite, refusals (issue 23, items 2, 8 and 12)
# --------------------------------------------------------------------------------------------------------------
TINY = ["--config", "tiny", "--batch-size", "2", "--size", "16", "--val-images", "2", "--search", "blocked"]


@pytest.fixture(scope="module")
def script() -> Any:
    """The training script as a module: its main() runs in this process (no interpreter start per run)."""
    spec = importlib.util.spec_from_file_location("train_diffusers_vq", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(script: Any, capsys, monkeypatch) -> Any:
    """run(*argv) -> (exit code, stdout, stderr) of the script's main()."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the script leaves torch's threads alone

    def call(*argv: str) -> tuple[int, str, str]:
        try:
            script.main([str(a) for a in argv])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return call


def one_line(err: str) -> str:
    """The script's stderr when it holds one error line (else the assertion shows all of it)."""
    lines = [line for line in err.strip().splitlines() if line.startswith("train_diffusers_vq.py: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return diffusers.VQModel.from_pretrained(folder).state_dict()


def test_resume_continues_a_stopped_run_exactly(tmp_path: Path, script: Any, run: Any, monkeypatch) -> None:
    """A run stopped during step 5 (checkpoint at 4, log lines at 3 and 6: the line at 6 averages steps on both
    sides of the stop) and resumed ends with the metrics, pictures and weights of a run never stopped."""
    common = [*TINY, "--steps", "6", "--log-every", "3", "--image-every", "3", "--checkpoint-every", "2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run("--out", straight, *common)[0] == 0
    blob = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert blob["global_step"] == 6 and {"state_dict", "optimizer", "rng", "log", "args"} <= set(blob)

    item = script.TrainStream.__getitem__

    def ctrl_c_in_step_5(self: Any, g: int) -> Any:
        if g == 4 * 2:  # the first sample of batch 5 (batch size 2)
            raise KeyboardInterrupt
        return item(self, g)

    monkeypatch.setattr(script.TrainStream, "__getitem__", ctrl_c_in_step_5)
    code, _, err = run("--out", stopped, *common)
    assert code == 130 and one_line(err) == ("train_diffusers_vq.py: interrupted at step 4; last.ckpt holds step 4: "
                                            "--resume continues from it")
    monkeypatch.setattr(script.TrainStream, "__getitem__", item)
    assert not (stopped / "model").exists()
    # what a stop after the checkpoint leaves: later metrics lines (one cut short) and pictures
    with (stopped / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/loss": 9.0}\n{"step": 6, "train/lo')
    (stopped / "images" / "recon_000006.png").write_bytes(b"stale")

    code, out, err = run("--out", stopped, *common, "--resume")
    assert code == 0, err
    assert "resuming at step 4" in out and f"reconstructions: {stopped / 'images' / 'recon_000006.png'}" in out
    assert rows(stopped) == rows(straight) and [r["step"] for r in rows(straight)] == [3, 6]
    assert sorted(p.name for p in (stopped / "images").iterdir()) == ["recon_000003.png", "recon_000006.png"]
    assert (stopped / "images" / "recon_000006.png").read_bytes() != b"stale"
    a, b = weights(straight / "model"), weights(stopped / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # resuming a finished run changes nothing
    files = [stopped / "metrics.jsonl", stopped / "checkpoints" / "last.ckpt",
             stopped / "model" / "diffusion_pytorch_model.safetensors"]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    code, out, err = run("--out", stopped, *common, "--resume")
    assert code == 0 and "nothing to train" in out, err
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before
    assert sorted(p.name for p in stopped.iterdir()) == ["args.json", "checkpoints", "images", "metrics.jsonl",
                                                          "model"]


def test_a_used_out_is_refused_without_resume_or_overwrite(tmp_path: Path, run: Any) -> None:
    out = tmp_path / "run"
    assert run("--out", out, *TINY, "--steps", "2")[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cases = [
        ([], "is not empty (args.json, checkpoints, images, metrics.jsonl, ...): --resume continues the run in it, "
             "--overwrite replaces its outputs, or name another --out"),
        (["--resume", "--overwrite"], "--resume continues the run in --out, --overwrite replaces it: pass one of them"),
        (["--resume", "--lr", "0.01"], "was trained with --lr 0.0004 (now 0.01): pass the run's own options"),
    ]
    for extra, message in cases:
        code, _, err = run("--out", out, *TINY, "--steps", "4", *extra)
        assert code == 1 and message in one_line(err), err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, _, err = run("--out", tmp_path / "new", *TINY, "--resume")
    assert code == 1 and "there is no" in one_line(err) and "start without --resume" in err
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_the_outputs_and_the_summary_names_this_runs_picture(tmp_path: Path, run: Any) -> None:
    out = tmp_path / "run"
    (tmp_path / "run").mkdir()
    (out / "notes.txt").write_text("mine")  # not the script's: --overwrite leaves it
    code, _, err = run("--out", out, *TINY, "--steps", "4", "--image-every", "2")
    assert code == 1 and "is not empty (notes.txt)" in one_line(err)
    assert run("--out", out, *TINY, "--steps", "4", "--image-every", "2", "--overwrite")[0] == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["recon_000002.png", "recon_000004.png"]
    code, stdout, _ = run("--out", out, *TINY, "--steps", "2", "--image-every", "2", "--overwrite")
    assert code == 0 and f"reconstructions: {out / 'images' / 'recon_000002.png'}" in stdout
    assert sorted(p.name for p in (out / "images").iterdir()) == ["recon_000002.png"]
    assert [r["step"] for r in rows(out)] == [2] and (out / "notes.txt").read_text() == "mine"
    row = rows(out)[-1]
    assert f"held-out PSNR {row['val/psnr']:.2f} dB at step 2 (a flat mean-colour image: " in stdout


def test_a_non_finite_stop_leaves_no_old_model_beside_the_new_metrics(tmp_path: Path, run: Any) -> None:
    out = tmp_path / "run"
    assert run("--out", out, *TINY, "--steps", "2")[0] == 0 and (out / "model").is_dir()
    code, _, err = run("--out", out, *TINY, "--steps", "6", "--lr", "1e30", "--log-every", "1", "--overwrite")
    line = one_line(err)
    assert code == 1 and "the loss is nan at step " in line and "lower --lr and start again with --overwrite" in line
    stop = int(line.split("at step ")[1].split()[0])
    assert not (out / "model").exists()
    assert [r["step"] for r in rows(out)] == list(range(1, stop))


def test_pretrained_with_kmeans_init_is_refused(tmp_path: Path, run: Any) -> None:
    tiny_vqmodel().save_pretrained(tmp_path / "pretrained")
    code, _, err = run("--out", tmp_path / "run", "--pretrained", tmp_path / "pretrained", "--codebook-init", "kmeans",
                       *TINY[2:], "--steps", "2")
    assert code == 1 and one_line(err) == (
        "train_diffusers_vq.py: --codebook-init kmeans re-initialises the codebook, but --pretrained brings a "
        "trained one, which is never re-initialised: drop --codebook-init kmeans to fine-tune it")
    assert not (tmp_path / "run").exists()


def test_the_default_codebook_init_keeps_a_pretrained_codebook(tmp_path: Path, run: Any) -> None:
    """--codebook-init auto (the default) is k-means from scratch only: a fine-tuned model starts from its own
    codebook (at --lr 0 the saved codebook is the pretrained one, bit for bit)."""
    pretrained = tiny_vqmodel()
    pretrained.save_pretrained(tmp_path / "pretrained")
    code, out, err = run("--out", tmp_path / "run", "--pretrained", tmp_path / "pretrained", *TINY[2:], "--steps", "1",
                         "--lr", "0")
    assert code == 0 and "codebook init upstream" in out and "codebook_init kmeans" not in out, err
    assert torch.equal(weights(tmp_path / "run" / "model")["quantize.embedding.weight"],
                       pretrained.quantize.embedding.weight.detach())
    code, out, _ = run("--out", tmp_path / "scratch", *TINY, "--steps", "1")
    assert code == 0 and "codebook init kmeans" in out and "codebook_init kmeans: 32 codes from 128" in out


def test_a_wrong_pretrained_path_ends_in_one_line_without_a_download(tmp_path: Path, run: Any, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    for name, message in ((tmp_path / "nope", "no such folder"), ("runs/nope", "no such folder"),
                          ("runs/empty", "no config.json in runs/empty: name a save_pretrained folder")):
        code, _, err = run("--out", tmp_path / "run", "--pretrained", name, *TINY[2:], "--steps", "2")
        assert code == 1 and f"--pretrained {name}: {message}" in one_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no --out folder left behind
    # a hub id (org/name): with the hub offline, one line too, from a fresh process (the hub reads its mode at import)
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "run"), "--pretrained",
                        "nobody-here/no-such-vqmodel", *TINY[2:]], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and one_line(r.stderr).startswith(
        "train_diffusers_vq.py: --pretrained nobody-here/no-such-vqmodel: not a folder here, and the Hugging Face hub "
        "did not give it: "), r.stderr
    assert not (tmp_path / "run").exists()


def test_the_training_stream_is_the_same_whatever_the_workers_and_the_start(script: Any) -> None:
    from adapters.evaluation.data import PhotoCrops

    base = PhotoCrops(size=16, length=6, photos="train", random_crop=True, layout="chw")
    stream = script.TrainStream(base, seed=3, batch_size=4)  # 4 samples per epoch (whole batches of 4)
    first = [stream[g]["image"] for g in range(12)]
    torch.manual_seed(123)  # the global RNG plays no part
    again = [stream[g]["image"] for g in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(torch.stack(first[:4]), torch.stack(first[4:8]))  # epochs differ (order, crops)
    loader = DataLoader(stream, batch_size=4, sampler=range(4, 12), num_workers=2)
    assert torch.equal(torch.cat([b["image"] for b in loader]), torch.stack(first[4:]))
