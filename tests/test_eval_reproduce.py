"""scripts/reproduce.sh: argument errors and the command sequence it runs (--dry-run: nothing is trained)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "reproduce.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=env)


def _commands(out: str, program: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("+ ") and program in line]


def test_scale_is_required_and_checked() -> None:
    for args in ([], ["--scale", "huge"]):
        res = _run(*args)
        assert res.returncode == 2 and "--scale tiny|small|full is required" in res.stderr
    res = _run("--scale", "tiny", "--bogus")
    assert res.returncode == 2 and "unknown option '--bogus'" in res.stderr
    res = _run("--scale", "tiny", "--rows", "vqgan_ste,nope", "--dry-run")
    assert res.returncode == 2 and "unknown row 'nope'" in res.stderr


def test_full_scale_needs_imagenet(tmp_path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k != "IMAGENET_ROOT"}
    res = _run("--scale", "full", "--out", str(tmp_path), env=env)
    assert res.returncode == 2 and "needs ImageNet" in res.stderr


def test_tiny_dry_run_trains_and_evaluates_every_row_offline(tmp_path) -> None:
    res = _run("--scale", "tiny", "--dry-run", "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    ldm = _commands(res.stdout, "latent-diffusion/main.py")
    enh = _commands(res.stdout, "enhancing-transformers/main.py")
    ev = _commands(res.stdout, "scripts/evaluate.py")
    assert len(ldm) == 3 and len(enh) == 2 and len(ev) == 5
    assert sum("GumbelVQModel" in c for c in ldm) == 1
    assert all("--gpus" not in c for c in ldm) and all("-ng 0" in c for c in enh)  # CPU
    assert all("--offline-photos" in c and "--offline" in c and "--no-fid" in c for c in ev)
    assert _commands(res.stdout, "scripts/make_tables.py")
    for cfg in re.findall(r"--base (\S+)", "\n".join(ldm)):
        assert (ROOT / cfg).is_file(), cfg
    for name in re.findall(r"-c (\S+)", "\n".join(enh)):
        assert (ROOT / "configs" / f"{name}.yaml").is_file(), name


def test_full_dry_run_sequence(tmp_path) -> None:
    res = _run("--scale", "full", "--dry-run", "--imagenet", "/data/imagenet", "--gpus", "0,1",
               "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    ldm = _commands(res.stdout, "latent-diffusion/main.py")
    enh = _commands(res.stdout, "enhancing-transformers/main.py")
    ev = _commands(res.stdout, "scripts/evaluate.py")
    assert len(ldm) == 6 and all("max_epochs=4" in c and "--gpus" in c for c in ldm)
    assert len(enh) == 2 and all("-e 10" in c and "-lr 1e-4" in c for c in enh)
    assert len(ev) == 8 and all("torchrun" in c and "--data-root /data/imagenet" in c for c in ev)
    assert sum("--batch-size 16" in c for c in ev) == 6 and sum("--batch-size 32" in c for c in ev) == 2
    for cfg in re.findall(r"--base (\S+)", "\n".join(ldm)):
        assert (ROOT / cfg).is_file(), cfg
    for name in re.findall(r"-c (\S+)", "\n".join(enh)):
        assert (ROOT / "configs" / f"{name}.yaml").is_file(), name


def test_seed_reaches_both_trainers_and_the_labels(tmp_path) -> None:
    res = _run("--scale", "tiny", "--dry-run", "--seed", "7", "--rows", "vqgan_rot,vit_rot",
               "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    assert all("--seed 7" in c for c in _commands(res.stdout, "latent-diffusion/main.py"))
    assert all(c.endswith("-s 7") for c in _commands(res.stdout, "enhancing-transformers/main.py"))
    assert all("(seed 7)" in c.replace("\\", "") for c in _commands(res.stdout, "scripts/evaluate.py"))


def test_small_dry_run_rows_seeds_and_summary(tmp_path) -> None:
    """--scale small: six rows (STE, released rotation, the paper's rotation; both codebases) per seed, the same
    number of steps for every row, evaluation at the training batch, then the across-seed summary."""
    res = _run("--scale", "small", "--dry-run", "--seeds", "0,1,2", "--steps", "64", "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    ldm = _commands(res.stdout, "latent-diffusion/main.py")
    enh = _commands(res.stdout, "enhancing-transformers/main.py")
    ev = _commands(res.stdout, "scripts/evaluate.py")
    assert len(ldm) == 9 and len(enh) == 9 and len(ev) == 18
    assert all("max_steps=64" in c and "base_learning_rate" not in c for c in ldm)  # the configs' lr
    assert all("-e 2 " in c and "-lr 1e-4" in c and "-ng 0" in c for c in enh)  # 2 epochs x 32 steps
    assert all("--batch-size 16" in c and "--offline-photos" in c for c in ev)
    for seed in (0, 1, 2):
        assert sum(f"--seed {seed}" in c for c in ldm) == 3 and sum(c.endswith(f"-s {seed}") for c in enh) == 3
    configs = set(re.findall(r"--base configs/(\S+)\.yaml", "\n".join(ldm))) | set(re.findall(r"-c (\S+)", "\n".join(enh)))
    assert configs == {"small_vqgan", "small_rot_vqgan", "small_rot_paper_vqgan",
                       "small_vitvqgan", "small_rot_vitvqgan", "small_rot_paper_vitvqgan"}
    assert _commands(res.stdout, "scripts/seed_summary.py")


def test_small_configs_keep_the_papers_codebooks() -> None:
    from omegaconf import OmegaConf

    grads = {"": "ste", "rot_": "rotation_released", "rot_paper_": "rotation"}
    for prefix, grad in grads.items():
        vq = OmegaConf.load(ROOT / "configs" / f"small_{prefix}vqgan.yaml").model.params
        assert (vq.n_embed, vq.embed_dim, vq.gradient) == (8192, 3, grad)
        assert vq.lossconfig.params.codebook_weight == 1.0 and vq.lossconfig.params.disc_start == 0
        vit = OmegaConf.load(ROOT / "configs" / f"small_{prefix}vitvqgan.yaml").model.params
        assert (vit.quantizer.n_embed, vit.quantizer.embed_dim, vit.gradient) == (8192, 32, grad)
        assert vit.quantizer.get("use_norm", True)


def test_small_init_kmeans_and_regime_rows(tmp_path) -> None:
    """--init kmeans: the VQGAN rows carry the config key, the ViT-VQGAN rows take the k-means configs; the regime
    arm's rows differ only in the estimator; --init is refused where it is not wired."""
    res = _run("--scale", "small", "--dry-run", "--init", "kmeans", "--steps", "2000", "--seed", "0",
               "--rows", "vqgan_ste,vqgan_rot,vqgan_regime_ste,vqgan_regime_rot,vit_ste,vit_rot",
               "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    ldm = _commands(res.stdout, "latent-diffusion/main.py")
    enh = _commands(res.stdout, "enhancing-transformers/main.py")
    assert len(ldm) == 4 and all(c.endswith("model.params.quantizer_config.codebook_init=kmeans") or
                                 "codebook_init=kmeans" in c for c in ldm)
    regime = [c for c in ldm if "small_regime_vqgan.yaml" in c]
    assert len(regime) == 2 and sum("model.params.gradient=ste" in c for c in regime) == 1
    assert {re.search(r"-c (\S+)", c).group(1) for c in enh} == {"small_kmeans_vitvqgan", "small_kmeans_rot_vitvqgan"}
    assert all("-e 63 " in c for c in enh)  # 2000 steps -> 63 whole epochs of 32
    assert "k-means init" in res.stdout
    res = _run("--scale", "tiny", "--dry-run", "--init", "kmeans", "--out", str(tmp_path / "t"))
    assert res.returncode == 2 and "--init kmeans is wired for --scale small only" in res.stderr
    res = _run("--scale", "small", "--dry-run", "--init", "random", "--out", str(tmp_path / "t"))
    assert res.returncode == 2 and "--init takes upstream or kmeans" in res.stderr


def test_regime_config_differs_from_the_small_one_only_in_the_codebook_size() -> None:
    from adapters.evaluation.model_loading import load_config

    a, b = load_config(ROOT / "configs" / "small_regime_vqgan.yaml"), load_config(ROOT / "configs" / "small_rot_vqgan.yaml")
    assert a.model.params.n_embed == 128 and b.model.params.n_embed == 8192
    a.model.params.n_embed = 8192
    assert a == b
