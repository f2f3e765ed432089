"""Every import of the project, and of the upstream code it runs, is declared in pyproject.toml.

The project runs upstream code that declares less than it imports (taming-transformers-rom1504's taming/util.py
imports requests; latent-diffusion's main.py imports packaging), so a fresh install failed at the main job and at test
collection while a developer's environment, grown by hand, worked. Two checks:

* static: the imports of adapters/, scripts/, tests/ and of the upstream modules the project reaches (both main.py
  files, the config targets, and what they import, followed through ldm, enhancing and taming) are mapped to their
  distributions, and each must be a dependency in pyproject.toml (tests/ and scripts/ may use the test extra);
* at run time: a fresh interpreter imports every project module and every upstream module reached, so an import
  that is declared but does not work (not installed) fails here too, naming the module.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from conftest import ENHANCING_TREE, HAS_ENHANCING, HAS_LDM, LDM_TREE, ROOT

# Imported only on request, in code the project never runs by default; not dependencies.
OPTIONAL = {
    "pudb": "latent-diffusion main.py's debugger (--debug, or SIGUSR2), falls back to pdb",
    "wandb": "enhancing's -l wandb logger only (-l auto takes it when installed)",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    """(runtime, test extra) distribution names from pyproject.toml (the installed metadata when tomllib is absent)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        reqs = [Requirement(r) for r in importlib.metadata.requires("rotation-trick-adapters") or []]
        return ({_norm(r.name) for r in reqs if not r.marker},
                {_norm(r.name) for r in reqs if r.marker and r.marker.evaluate({"extra": "test"})})
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return ({_norm(Requirement(r).name) for r in project["dependencies"]},
            {_norm(Requirement(r).name) for r in project.get("optional-dependencies", {}).get("test", [])})


def _taming_root() -> Path | None:
    spec = importlib.util.find_spec("taming")
    return Path(spec.submodule_search_locations[0]).parent if spec and spec.submodule_search_locations else None


# Where the first name of a dotted module lives (the upstream trees only when present).
BASES: dict[str, Path | None] = {"adapters": ROOT, "ldm": LDM_TREE if HAS_LDM else None,
                                 "enhancing": ENHANCING_TREE if HAS_ENHANCING else None, "taming": _taming_root()}
# Names that are the project's own or upstream's top-level scripts, not distributions.
LOCAL = set(BASES) | {"main"} | {p.stem for p in (ROOT / "tests").glob("*.py")} \
    | {p.stem for p in (ROOT / "scripts").glob("*.py")}


def _resolve(module: str) -> Path | None:
    base = BASES.get(module.split(".")[0])
    if base is None:
        return None
    path = base.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str | None:
    """The dotted name of a file in adapters/, ldm/, enhancing/ or taming/ (None for scripts, tests, main.py)."""
    for top, base in BASES.items():
        if base is not None and path.is_relative_to(base / top):
            parts = list(path.relative_to(base).with_suffix("").parts)
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return None


def _config_targets() -> set[str]:
    """Modules named by `target:` in configs/ (classes the upstream main.py files instantiate)."""
    targets: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("target"), str):
                targets.add(node["target"].rsplit(".", 1)[0])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for config in (ROOT / "configs").glob("*.yaml"):
        walk(yaml.safe_load(config.read_text()))
    return targets


def scan() -> tuple[dict[str, set[str]], list[Path]]:
    """Third-party top-level imports -> the files importing them, and the upstream/project files reached."""
    roots = [*(ROOT / "adapters").rglob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    roots += [tree / "main.py" for tree, present in ((LDM_TREE, HAS_LDM), (ENHANCING_TREE, HAS_ENHANCING)) if present]
    roots += [p for p in map(_resolve, _config_targets()) if p is not None]
    external: dict[str, set[str]] = {}
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # relative: within the same package
                base = path.parent.joinpath(*[".."] * (node.level - 1), *(node.module or "").split(".")).resolve()
                todo += [c for a in node.names for c in (base / f"{a.name}.py", base / a.name / "__init__.py",
                                                          base.with_suffix(".py")) if c.is_file()]
                continue
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__":
                    continue
                if top in LOCAL:
                    found = _resolve(name)
                    if found is not None:
                        todo.append(found)
                else:
                    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                    external.setdefault(top, set()).add(str(where))
    return external, sorted(seen)


def test_every_import_is_declared() -> None:
    runtime, test_extra = declared()
    external, _ = scan()
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for top, files in sorted(external.items()):
        if top in OPTIONAL:
            continue
        # tests/ and scripts/ run after `pip install -e '.[test]'` (the README's set-up); the rest needs no extra
        allowed = runtime | test_extra if all(f.startswith(("tests/", "scripts/")) for f in files) else runtime
        dists = {_norm(d) for d in distributions.get(top, [])}
        example = min(files, key=lambda f: (f.startswith(("tests/", "scripts/")), f))  # the file that needs it most
        if not dists:
            problems.append(f"{top} (imported by {example}) is not installed: declare its distribution in pyproject.toml")
        elif not dists & allowed:
            problems.append(f"{top} (distribution {'/'.join(sorted(dists))}, imported by {example}) is not declared "
                            f"in pyproject.toml {'[project.optional-dependencies] test' if allowed != runtime else 'dependencies'}")
    assert not problems, "\n".join(problems)


def test_the_scan_sees_the_upstream_code_the_project_runs() -> None:
    """Guards the check above against finding nothing: taming (a pip dependency) is always followed, and the trees
    when present; requests comes only from taming/util.py."""
    external, files = scan()
    names = {_module_name(p) for p in files}
    assert {"taming.util", "taming.modules.losses.vqperceptual", "adapters.integrations.losses"} <= names
    assert any("taming/util.py" in f for f in external["requests"])
    if HAS_LDM:
        assert {"ldm.models.autoencoder", "ldm.lr_scheduler"} <= names and LDM_TREE / "main.py" in files
        assert "packaging" in external
    if HAS_ENHANCING:
        assert {"enhancing.modules.stage1.vitvqgan", "enhancing.utils.general", "enhancing.dataloader"} <= names


def test_a_fresh_interpreter_imports_every_module_reached() -> None:
    _, files = scan()
    modules = sorted({m for p in files if (m := _module_name(p))})
    mains = [tree / "main.py" for tree, present in ((LDM_TREE, HAS_LDM), (ENHANCING_TREE, HAS_ENHANCING)) if present]
    absent = [top for top in ("ldm", "enhancing") if BASES[top] is None]  # adapters.integrations.ldm needs ldm, ...
    code = "\n".join([
        "import importlib, importlib.util, sys",
        f"sys.path[:0] = {[str(ROOT)] + [str(m.parent) for m in mains]!r}",
        "failed = []",
        f"for name in {modules!r}:",
        "    try: importlib.import_module(name)",
        f"    except ModuleNotFoundError as e:",
        f"        if (e.name or '').split('.')[0] not in {absent!r}: failed.append(f'{{name}}: {{e!r}}')",
        "    except Exception as e: failed.append(f'{name}: {type(e).__name__}: {e}')",
        f"for i, path in enumerate({[str(m) for m in mains]!r}):",  # both are `main`: load each under its own name
        "    spec = importlib.util.spec_from_file_location(f'upstream_main_{i}', path)",
        "    try: spec.loader.exec_module(importlib.util.module_from_spec(spec))",
        "    except Exception as e: failed.append(f'{path}: {type(e).__name__}: {e}')",
        "print('\\n'.join(failed)); sys.exit(1 if failed else 0)",
    ])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize("missing", ["requests", "packaging"])
def test_the_check_fails_when_a_dependency_is_not_declared(missing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, test_extra = declared()
    monkeypatch.setattr(sys.modules[__name__], "declared", lambda: (runtime - {missing}, test_extra))
    with pytest.raises(AssertionError, match=f"{missing} .*is not declared"):
        test_every_import_is_declared()
