"""Which checkpoint a run wrote last, by the training step stored in it (for scripts/reproduce.sh).

    python scripts/lib/checkpoints.py newest CKPT_OR_DIR [...]   # path of the checkpoint with the highest global_step
                                                                 # (crash.ckpt never, unless --include-crash)
    python scripts/lib/checkpoints.py step CKPT                  # its global_step
    python scripts/lib/checkpoints.py record-step RECORD.json    # checkpoint.global_step of an evaluation record

Why by the stored step: file names sort as text (``epoch=99`` after ``epoch=121``) and a folder reused by a rerun
keeps an earlier run's files; the step inside each file says which is latest. Ties go to the newer file. A file that
cannot be read is named on stderr and skipped; no readable checkpoint exits 1 with one line. ``crash.ckpt`` (the
run guard's save of a run that died of an error: its state may be what killed it) is never picked unless asked.
Only the step is read: the file is memory-mapped, so its tensors are never read from disk.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


CRASH_NAME = "crash.ckpt"  # adapters.runtime.run_guard.CRASH (not imported: this script runs before any install check)


def stored_step(path: Path) -> int:
    """global_step stored in a Lightning checkpoint: weights-only (nothing in it is run) and memory-mapped, so the
    tensors stay on disk; a file in torch's legacy (non-zip) format, which cannot be mapped, is read whole."""
    import torch

    from adapters.runtime.safe_load import load_checkpoint, unsafe_globals

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    if not unsafe_globals(path):  # also registers the project's allowlist for weights_only loading
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return int(ckpt.get("global_step", -1))
        except RuntimeError as err:
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
    ckpt = load_checkpoint(path, trust=False)
    return int(ckpt.get("global_step", -1))


def newest(paths: list[Path], include_crash: bool = False) -> tuple[Path, int]:
    """(checkpoint, step) with the highest stored step among files and the *.ckpt files of folders; a folder's
    crash.ckpt counts only with ``include_crash`` (a file named on the command line always counts)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += [f for f in sorted(p.rglob("*.ckpt")) if include_crash or f.name != CRASH_NAME]
        else:
            files.append(p)
    best: tuple[int, float, Path] | None = None
    for f in files:
        try:
            key = (stored_step(f), f.stat().st_mtime, f)
        except Exception as exc:  # a truncated or foreign file must not hide the good ones
            print(f"checkpoints.py: skipped {f}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                  file=sys.stderr)
            continue
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        raise SystemExit(f"checkpoints.py: no readable checkpoint in {', '.join(map(str, paths))}")
    return best[2], best[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    new = sub.add_parser("newest")
    new.add_argument("paths", nargs="+", type=Path)
    new.add_argument("--include-crash", action="store_true", help="let a crash.ckpt be picked (never by default)")
    sub.add_parser("step").add_argument("path", type=Path)
    sub.add_parser("record-step").add_argument("path", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "newest":
        print(newest(args.paths, args.include_crash)[0])
    elif args.cmd == "step":
        print(stored_step(args.path))
    else:
        record = json.loads(args.path.read_text())
        print(int((record.get("checkpoint") or {}).get("global_step", -1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
