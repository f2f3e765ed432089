"""scripts/setup_submodules.sh and patches/: patches fit the pinned upstream, runs are idempotent, errors are clear."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import LDM_TREE, ROOT, requires_ldm

SCRIPT = ROOT / "scripts" / "setup_submodules.sh"
LDM_PATCHES = sorted((ROOT / "patches" / "latent-diffusion").glob("*.patch"))
LDM_PIN = "a506df5756472e2ebaf9078affdde2c4f1502cd4"


def touched_files(patches: list[Path]) -> list[str]:
    out: set[str] = set()
    for p in patches:
        out.update(re.findall(r"^\+\+\+ b/(\S+)", p.read_text(), flags=re.M))
    return sorted(out)


def git_apply(cwd: Path, patch: Path, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(cwd.parent))
    return subprocess.run(["git", "apply", *flags, str(patch)], cwd=cwd, env=env, capture_output=True, text=True)


def pristine_copy(dest: Path) -> Path:
    """The pinned upstream versions of the patched files: the tree's files with the whole series reversed."""
    for f in touched_files(LDM_PATCHES):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(LDM_TREE / f, dest / f)
    for p in reversed(LDM_PATCHES):
        res = git_apply(dest, p, "--reverse")
        assert res.returncode == 0, f"{p.name} does not reverse-apply to the tree: {res.stderr}"
    return dest


def mirror_git_dir() -> Path | None:
    """A bare clone of CompVis/latent-diffusion to compare against, if this machine has one ($LDM_UPSTREAM_GIT_DIR)."""
    for cand in (os.environ.get("LDM_UPSTREAM_GIT_DIR"), ROOT.parent / ".mirror" / "CompVis+latent-diffusion" / "repo"):
        if cand and Path(cand).is_dir():
            ok = subprocess.run(["git", "--git-dir", str(cand), "cat-file", "-e", f"{LDM_PIN}^{{commit}}"],
                                capture_output=True)
            if ok.returncode == 0:
                return Path(cand)
    return None


def make_project(tmp: Path, with_tree: bool) -> Path:
    proj = tmp / "proj"
    (proj / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, proj / "scripts" / SCRIPT.name)
    shutil.copytree(ROOT / "patches" / "latent-diffusion", proj / "patches" / "latent-diffusion")
    (proj / ".gitmodules").write_text('[submodule "third_party/latent-diffusion"]\n'
                                      "\tpath = third_party/latent-diffusion\n"
                                      "\turl = https://github.com/CompVis/latent-diffusion\n")
    if with_tree:
        pristine_copy(proj / "third_party" / "latent-diffusion")
    return proj


def run_setup(proj: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    full_env.pop("LATENT_DIFFUSION_URL", None) if "LATENT_DIFFUSION_URL" not in env else None
    return subprocess.run(["bash", str(proj / "scripts" / SCRIPT.name), *args], cwd=proj, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_every_patch_has_a_header_and_is_listed() -> None:
    assert LDM_PATCHES, "patches/latent-diffusion is empty"
    readme = (ROOT / "patches" / "README.md").read_text()
    for p in LDM_PATCHES:
        head = p.read_text().split("\ndiff --git", 1)[0]
        assert len(head.strip()) > 40 and not head.startswith("diff"), f"{p.name} has no header saying why"
        assert p.name in readme, f"{p.name} is not listed in patches/README.md"


@requires_ldm
def test_patches_apply_to_the_pinned_commit(tmp_path: Path) -> None:
    pristine = pristine_copy(tmp_path / "pristine")
    mirror = mirror_git_dir()
    if mirror is not None:  # the reversed files must be exactly upstream's pinned files
        for f in touched_files(LDM_PATCHES):
            upstream = subprocess.run(["git", "--git-dir", str(mirror), "show", f"{LDM_PIN}:{f}"],
                                      capture_output=True, check=True).stdout
            assert (pristine / f).read_bytes() == upstream, f
    for p in LDM_PATCHES:  # and the series applies forward, one patch at a time, back to the tree's files
        res = git_apply(pristine, p, "--check")
        assert res.returncode == 0, f"{p.name}: {res.stderr}"
        git_apply(pristine, p)
    for f in touched_files(LDM_PATCHES):
        assert (pristine / f).read_bytes() == (LDM_TREE / f).read_bytes(), f


@requires_ldm
def test_setup_patches_once_then_is_a_no_op_and_installs(tmp_path: Path) -> None:
    proj = make_project(tmp_path, with_tree=True)
    first = run_setup(proj, "--no-install", "--no-fetch")
    assert first.returncode == 0, first.stderr
    assert "tree already present" in first.stdout
    assert f"patches: {len(LDM_PATCHES)} applied, 0 already applied" in first.stdout
    patched = {f: (proj / "third_party" / "latent-diffusion" / f).read_bytes() for f in touched_files(LDM_PATCHES)}
    for f, data in patched.items():
        assert data == (LDM_TREE / f).read_bytes(), f
    # second run: nothing to do; it installs through the interpreter in $PYTHON
    fake_python = tmp_path / "python"
    record = tmp_path / "pip_calls"
    fake_python.write_text(f'#!/usr/bin/env bash\necho "$@" >> "{record}"\n')
    fake_python.chmod(0o755)
    second = run_setup(proj, "--no-fetch", PYTHON=str(fake_python))
    assert second.returncode == 0, second.stderr
    assert f"patches: 0 applied, {len(LDM_PATCHES)} already applied" in second.stdout
    for f, data in patched.items():
        assert (proj / "third_party" / "latent-diffusion" / f).read_bytes() == data
    assert f"-m pip install -e {proj}[test]" in record.read_text()


@requires_ldm
def test_conflict_names_the_patch(tmp_path: Path) -> None:
    proj = make_project(tmp_path, with_tree=True)
    main = proj / "third_party" / "latent-diffusion" / "main.py"
    main.write_text(main.read_text().replace("parser = Trainer.add_argparse_args(parser)\n",
                                             "parser = my_local_edit(parser)\n"))
    res = run_setup(proj, "--no-install", "--no-fetch")
    assert res.returncode == 1
    assert "0003-lightning2-trainer-arguments.patch does not apply" in res.stderr


@requires_ldm
def test_a_tree_patched_by_an_older_version_of_the_patches_is_told_to_be_exported_again(tmp_path: Path) -> None:
    proj = make_project(tmp_path, with_tree=True)
    older = tmp_path / "older"  # the series as an earlier checkout had it: one patch imported another path
    shutil.copytree(proj / "patches" / "latent-diffusion", older)
    (p10,) = older.glob("0010-*.patch")
    p10.write_text(p10.read_text().replace("from adapters.runtime.safe_load import", "from adapters.safe_load import"))
    tree = proj / "third_party" / "latent-diffusion"
    for p in sorted(older.glob("*.patch")):
        assert git_apply(tree, p).returncode == 0, p.name
    res = run_setup(proj, "--no-install", "--no-fetch")
    assert res.returncode == 1
    assert ".patch does not apply to third_party/latent-diffusion" in res.stderr  # the first that no longer fits
    assert "patched by an older version of patches/" in res.stderr
    assert "delete third_party/latent-diffusion" in res.stderr and "fresh export of that commit" in res.stderr


def test_missing_tree_without_network_is_one_clear_message(tmp_path: Path) -> None:
    proj = make_project(tmp_path, with_tree=False)
    res = run_setup(proj, "--no-install", "--no-fetch")
    assert res.returncode == 1
    assert "third_party/latent-diffusion is missing and could not be fetched" in res.stderr
    assert "LATENT_DIFFUSION_URL" in res.stderr


def test_allow_missing_reports_the_tree_and_still_installs(tmp_path: Path) -> None:
    """CI's set-up: no tree can be fetched, the project is installed anyway and the tree's tests skip."""
    proj = make_project(tmp_path, with_tree=False)
    fake_python = tmp_path / "python"
    record = tmp_path / "pip_calls"
    fake_python.write_text(f'#!/usr/bin/env bash\necho "$@" >> "{record}"\n')
    fake_python.chmod(0o755)
    res = run_setup(proj, "--no-fetch", "--allow-missing", PYTHON=str(fake_python))
    assert res.returncode == 0, res.stderr
    assert "third_party/latent-diffusion is missing" in res.stderr
    assert "tests that need them will skip" in res.stdout
    assert f"-m pip install -e {proj}[test]" in record.read_text()


def test_unreachable_url_override_is_one_clear_message(tmp_path: Path) -> None:
    proj = make_project(tmp_path, with_tree=False)
    git = ["git", "-C", str(proj), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "update-index", "--add", "--cacheinfo",
                    f"160000,{LDM_PIN},third_party/latent-diffusion"], check=True)
    nowhere = tmp_path / "no-such-mirror"
    res = run_setup(proj, "--no-install", LATENT_DIFFUSION_URL=str(nowhere))
    assert res.returncode == 1
    assert f"could not be fetched from {nowhere} (commit {LDM_PIN})" in res.stderr
    assert "--no-fetch" in res.stderr and "--allow-missing" in res.stderr  # what a user behind a firewall needs


def test_unknown_option() -> None:
    res = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown option '--frobnicate'" in res.stderr


@requires_ldm
def test_fetches_the_pinned_commit_from_a_mirror_then_patches(tmp_path: Path) -> None:
    # a stand-in upstream: one commit holding the pinned versions of the patched files
    src = tmp_path / "mirror"
    pristine_copy(src)
    git_src = ["git", "-C", str(src), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git_src, "init", "-q"], check=True)
    subprocess.run([*git_src, "add", "-A"], check=True)
    subprocess.run([*git_src, "commit", "-qm", "pinned"], check=True)
    sha = subprocess.run([*git_src, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    proj = make_project(tmp_path, with_tree=False)
    git = ["git", "-C", str(proj), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "update-index", "--add", "--cacheinfo", f"160000,{sha},third_party/latent-diffusion"],
                   check=True)
    res = run_setup(proj, "--no-install", LATENT_DIFFUSION_URL=str(src))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"fetching third_party/latent-diffusion from {src} (commit {sha})" in res.stdout
    assert f"patches: {len(LDM_PATCHES)} applied" in res.stdout
    for f in touched_files(LDM_PATCHES):
        assert (proj / "third_party" / "latent-diffusion" / f).read_bytes() == (LDM_TREE / f).read_bytes(), f
