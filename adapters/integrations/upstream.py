"""Importing the upstream packages: one clear error when their tree is not set up.

``ldm`` comes from ``third_party/latent-diffusion`` and ``enhancing`` from ``third_party/enhancing-transformers``;
neither is installed, so a fresh clone (no trees) or a process without the tree on ``sys.path`` would only say
"No module named 'ldm'". Wrap the imports in :func:`upstream_imports` to raise ``UpstreamMissingError`` instead,
naming the tree and ``scripts/setup_submodules.sh``.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from adapters.runtime.errors import UpstreamMissingError

ROOT = Path(__file__).resolve().parents[2]  # adapters/integrations/upstream.py -> the project root
# package -> the tree (relative to the project root) it is imported from
UPSTREAM_TREES: dict[str, str] = {"ldm": "third_party/latent-diffusion",
                                  "enhancing": "third_party/enhancing-transformers"}


def missing_upstream_message(package: str, module: str) -> str:
    """Why ``module`` (in upstream ``package``) cannot be imported, and what to do."""
    tree = UPSTREAM_TREES[package]
    if not (ROOT / tree / package).is_dir():
        return (f"cannot import {module!r}: the upstream tree {tree} is absent (a fresh clone?). Run "
                f"scripts/setup_submodules.sh to fetch and patch it")
    return (f"cannot import {module!r} from {tree}: run through its main.py or scripts/evaluate.py (they put the "
            f"tree on sys.path) or add {ROOT / tree} to PYTHONPATH; if the tree is incomplete, run "
            f"scripts/setup_submodules.sh")


@contextmanager
def upstream_imports(package: str) -> Iterator[None]:
    """Imports of upstream ``package`` ('ldm' or 'enhancing') inside this block raise ``UpstreamMissingError`` when
    the package (or one of its modules) is missing; a missing dependency of the tree propagates unchanged."""
    if package not in UPSTREAM_TREES:
        raise ValueError(f"unknown upstream package {package!r}; known: {sorted(UPSTREAM_TREES)}")
    try:
        yield
    except UpstreamMissingError:
        raise
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing != package and not missing.startswith(package + "."):
            raise
        err = UpstreamMissingError(missing_upstream_message(package, missing))
        err.name = missing
        raise err from exc
