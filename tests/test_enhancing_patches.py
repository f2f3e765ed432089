"""patches/enhancing-transformers: well-formed, applied to the tree exactly once, and reversible to the pinned files."""
from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENHANCING_TREE, ROOT, requires_enhancing

PATCH_DIR = ROOT / "patches" / "enhancing-transformers"
PATCHES = sorted(PATCH_DIR.glob("*.patch"))


def _git_apply(tree: Path, patch: Path, *flags: str) -> subprocess.CompletedProcess:
    # The ceiling keeps git from using the project's repository as the root for paths inside the tree.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)}
    return subprocess.run(["git", "apply", *flags, str(patch)], cwd=tree, env=env, capture_output=True, text=True)


def _touched_files(patch: Path) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\+\+\+ b/(\S+)", patch.read_text(), flags=re.M)]


def test_patches_are_small_unified_diffs_with_a_header() -> None:
    assert len(PATCHES) >= 6, f"expected the enhancing-transformers patch series in {PATCH_DIR}"
    for patch in PATCHES:
        text = patch.read_text()
        first_diff = min(i for i in (text.find("\n--- "), text.find("\ndiff ")) if i >= 0)
        header = text[:first_diff]
        assert header.startswith("Why:") and len(header.split()) > 15, f"{patch.name}: header must say why"
        assert "1778fc497ea11ed2cef134404f99d4d6b921cda9" in header, f"{patch.name}: header names the pinned commit"
        assert _touched_files(patch), f"{patch.name}: no b/ paths"
        changed = [ln for ln in text[first_diff:].splitlines()
                   if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
        assert 0 < len(changed) < 120, f"{patch.name}: {len(changed)} changed lines, keep patches small"


@requires_enhancing
def test_tree_is_patched_exactly_once(tmp_path: Path) -> None:
    """The series reverse-applies, newest first, to a copy of the tree (so all of it is applied, in order; later
    patches may edit lines an earlier one uses as context, as scripts/setup_submodules.sh allows), and no patch
    applies forward again."""
    copy = tmp_path / "tree"
    for f in sorted({f for p in PATCHES for f in _touched_files(p)}):
        (copy / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ENHANCING_TREE / f, copy / f)
    for patch in reversed(PATCHES):
        assert _git_apply(copy, patch, "--reverse").returncode == 0, \
            f"{patch.name} is not applied to {ENHANCING_TREE}: run scripts/setup_submodules.sh"
    for patch in PATCHES:
        forward = _git_apply(ENHANCING_TREE, patch, "--check")
        assert forward.returncode != 0, f"{patch.name} would apply a second time"


@requires_enhancing
def test_series_round_trips_through_the_pinned_files(tmp_path: Path) -> None:
    """Reverse the series (newest first) on a copy, check the result is upstream's, then re-apply in order."""
    files = sorted({f for p in PATCHES for f in _touched_files(p)})
    copy = tmp_path / "tree"
    for f in files:
        (copy / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ENHANCING_TREE / f, copy / f)
    for patch in reversed(PATCHES):
        r = _git_apply(copy, patch, "--reverse")
        assert r.returncode == 0, f"{patch.name} does not reverse: {r.stderr}"
    # Upstream's pinned files: the CUDA ops are built at import time and main.py passes gpus=.
    assert "fused = load(" in (copy / "enhancing/losses/op/fused_act.py").read_text()
    assert "gpus=args.num_gpus" in (copy / "main.py").read_text()
    assert not (copy / "enhancing/losses/op/lazy_ext.py").exists()
    for patch in PATCHES:
        r = _git_apply(copy, patch)
        assert r.returncode == 0, f"{patch.name} does not apply to the pinned files: {r.stderr}"
    for f in files:
        assert filecmp.cmp(copy / f, ENHANCING_TREE / f, shallow=False), f"{f} differs after a round trip"


@requires_enhancing
def test_patched_main_parses_the_documented_options() -> None:
    r = subprocess.run([sys.executable, str(ENHANCING_TREE / "main.py"), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for opt in ("--num_gpus", "--num_processes", "--logger", "--outdir", "--resume", "--update_every"):
        assert opt in r.stdout


@requires_enhancing
def test_resume_from_a_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ENHANCING_TREE / "main.py"), "-c", "tiny_rot_vitvqgan", "-ng", "0",
                        "-r", str(tmp_path / "nope.ckpt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--resume" in r.stderr and "nope.ckpt" in r.stderr


@requires_enhancing
def test_wandb_logger_without_wandb_is_one_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    from enhancing.utils.general import make_logger

    with pytest.raises(ImportError, match="pip install wandb"):
        make_logger("wandb", tmp_path, "x")
    assert type(make_logger("auto", tmp_path, "x")).__name__ == "TensorBoardLogger"
    assert type(make_logger("csv", tmp_path, "x")).__name__ == "CSVLogger"


@requires_enhancing
def test_image_logger_writes_pictures_to_tensorboard(tmp_path: Path) -> None:
    """The TensorBoard branch that replaced upstream's TestTubeLogger one logs [0, 1] grids unchanged."""
    from types import SimpleNamespace

    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    from enhancing.utils.callback import ImageLogger

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tensorboard", version="")
    seen = {}
    logger.experiment.add_image = lambda tag, img, global_step: seen.update({tag: (img, global_step)})
    callback = ImageLogger(batch_frequency=4, max_images=2)
    images = {"reconstructions": torch.rand(2, 3, 8, 8)}
    callback.logger_log_images[TensorBoardLogger](SimpleNamespace(logger=logger, global_step=7), images, 7, "val")
    img, step = seen["val/reconstructions"]
    assert step == 7 and float(img.max()) <= 1.0 and float(img.min()) >= 0.0
    assert torch.equal(img[:, 2:10, 2:10], images["reconstructions"][0])  # make_grid pads by 2, no rescaling
