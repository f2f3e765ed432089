"""Shared test fixtures: where the upstream trees are, and one skip reason when they are absent."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY = ROOT / "third_party"
LDM_TREE = THIRD_PARTY / "latent-diffusion"
ENHANCING_TREE = THIRD_PARTY / "enhancing-transformers"


def tree_present(tree: Path, probe: str) -> bool:
    """True when an upstream tree was written into its submodule path (probe: a file it must hold)."""
    return (tree / probe).is_file()


HAS_LDM = tree_present(LDM_TREE, "ldm/models/autoencoder.py")
HAS_ENHANCING = tree_present(ENHANCING_TREE, "enhancing/modules/stage1/vitvqgan.py")

requires_ldm = pytest.mark.skipif(
    not HAS_LDM,
    reason="third_party/latent-diffusion is absent (fresh clone): run scripts/setup_submodules.sh to test against it",
)
requires_enhancing = pytest.mark.skipif(
    not HAS_ENHANCING,
    reason="third_party/enhancing-transformers is absent (fresh clone): run scripts/setup_submodules.sh to test against it",
)



def pytest_configure(config: pytest.Config) -> None:
    """Trees that are present are tested as the project runs them: patched. Applying is idempotent (a no-op when
    scripts/setup_submodules.sh already ran); a tree the patches do not fit stops the run with the script's message."""
    if not (HAS_LDM or HAS_ENHANCING):
        return
    res = subprocess.run(["bash", str(ROOT / "scripts" / "setup_submodules.sh"), "--no-fetch", "--no-install",
                          "--allow-missing"], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise pytest.UsageError(f"the upstream trees in third_party/ could not be patched:\n{res.stderr}")


# Tests (not library code) import the upstream packages the way upstream main.py does: from the tree's root.
for _tree, _present in ((LDM_TREE, HAS_LDM), (ENHANCING_TREE, HAS_ENHANCING)):
    if _present and str(_tree) not in sys.path:
        sys.path.append(str(_tree))


def run_ranks(worker, out: Path, world: int = 2) -> None:
    """Run ``worker(rank, world, port, str(out))`` in ``world`` spawned processes (a gloo group on a free local port)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, str(out)), nprocs=world, join=True, start_method="spawn")
