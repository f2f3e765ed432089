"""Evaluation records on disk: JSON that stays small and diffable (issue 17, item 5).

A record holds per-code counts (8,192 numbers for the paper's codebooks). Written with ``indent`` they took one line
each (~8,400 lines a record); here every list of plain numbers (or strings) goes on one line, deep dicts of leaves
too (see ``_dump``), and everything else keeps one key per line. Both forms are the same JSON: ``json.loads``
(make_tables.py, seed_summary.py) reads either unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

_SCALARS = (int, float, bool, type(None))
_LEAF = _SCALARS + (str,)


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, _SCALARS) for v in value)


def _is_curve(value: Any) -> bool:
    """A list of number lists (a binned curve's ``[[steps], [values]]``)."""
    return isinstance(value, list) and bool(value) and all(_is_number_list(v) for v in value)


def _dump(value: Any, level: int, indent: int) -> str:
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    # deep dicts of scalars, strings and number lists (a summary's per-seed metrics, a verdict with its words,
    # differences and interval; a seed's binned curves, [[steps], [values]] per series) on one line: they are
    # leaves, read as one (a remedies summary compares ~35 pairs of 9 metrics over ~20 rows of 3 to 5 seeds: one line
    # per verdict and per seed's curves keeps it near 1,000 lines)
    if isinstance(value, dict) and value and not (level >= 3 and all(
            isinstance(v, _LEAF) or _is_number_list(v) or _is_curve(v) for v in value.values())):
        items = [f"{inner}{json.dumps(str(k))}: {_dump(v, level + 1, indent)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    # a list of number lists (a curve's [[steps], [values]]) is one line too
    # and so is a list of plain strings (a summary's record digests: one a line made it grow by a line a record)
    if isinstance(value, list) and value and not _is_number_list(value) and not _is_curve(value) \
            and not all(isinstance(v, str) for v in value):
        return "[\n" + ",\n".join(inner + _dump(v, level + 1, indent) for v in value) + "\n" + pad + "]"
    return json.dumps(value)  # scalars, empty containers, and number lists on one line


def dumps_record(record: Any, indent: int = 1, default: Optional[Callable[[Any], Any]] = None) -> str:
    """``record`` as JSON text: one key per line, number lists on one line, a trailing newline.

    ``default`` converts what JSON cannot hold (as ``json.dumps``'s); the text parses back to the same value.
    """
    plain = json.loads(json.dumps(record, default=default))
    return _dump(plain, 0, indent) + "\n"


def rewrite_compact(path: Path) -> bool:
    """Rewrite one record file in the compact form; True when its text changed (its content never does)."""
    text = path.read_text()
    new = dumps_record(json.loads(text))
    if new == text:
        return False
    if json.loads(new) != json.loads(text):  # a guard, not an expectation: never change what a record says
        raise AssertionError(f"{path}: compact form would change the record")
    path.write_text(new)
    return True


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m adapters.evaluation.records FILE_OR_DIR ...``: rewrite evaluation records (*.json) compactly."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("paths", nargs="+", type=Path)
    files = [f for q in p.parse_args(argv).paths for f in (sorted(q.rglob("*.json")) if q.is_dir() else [q])]
    changed = [f for f in files if "code_counts" in f.read_text() and rewrite_compact(f)]
    print(f"records: {len(changed)} of {len(files)} files rewritten in the compact form")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
