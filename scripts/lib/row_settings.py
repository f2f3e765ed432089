"""What made a row of scripts/reproduce.sh: its settings and their fingerprint, and the check before a rerun reuses it.

    python scripts/lib/row_settings.py made-by --trainer ldm --config C [--overrides "k=v ..."] [--seed S] [--lr LR]
                                       [--init upstream|kmeans] [--remedy NAME] [--steps-target N]
        # one line of JSON: {"init", "remedy", "seed", "config", "fingerprint"}
    python scripts/lib/row_settings.py check --expect JSON PATH   # PATH: a record (.json) or a run's made_by.json
        # exit 0: PATH was made with these settings; exit 3 with one line saying what differs; exit 1: unreadable
    # (both lines on stdout, for reproduce.sh's refusal)

Why: a rerun skips a row whose record is at the requested step and resumes a row's leftover run folder. Both must
be what this invocation asks for: a record made with taming's init must never be skipped as "finished" by a
``--init kmeans`` run, nor a run folder made without the k-means override be resumed under it. The fingerprint is
sha256 over the trainer, the config file's bytes (and the bytes of the base config it names), the command-line
overrides, the seed and the learning rate: everything that makes the run, and nothing about its length (``--steps``
may grow a finished row). Records from before fingerprints (no ``row.made_by``) are judged by what they do carry:
their saved config's ``codebook_init`` and remedy keys.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

ROOT = Path(__file__).resolve().parents[2]
# The quantizer keys a remedy sets (issue 24); a record whose config sets none of them is "plain".
REMEDY_KEYS = ("codebook_update", "dead_code_threshold", "codebook_param", "use_residual", "rotation_scope")


def _config_bytes(config: str) -> bytes:
    """The config's bytes and those of the base config it names (enhancing configs: ``base_config: <path>``)."""
    path = Path(config)
    if not path.suffix:
        path = ROOT / "configs" / f"{config}.yaml"
    elif not path.is_absolute():
        path = ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"row_settings: no config {path}")
    blob = path.read_bytes()
    for line in blob.decode(errors="replace").splitlines():
        if line.startswith("base_config:"):
            base = line.split(":", 1)[1].strip().strip("'\"")
            if base:
                blob += b"\0" + _config_bytes(base)
            break
    return blob


def made_by(trainer: str, config: str, overrides: str = "", seed: Optional[str] = None, lr: Optional[str] = None,
            init: str = "upstream", remedy: str = "plain") -> dict[str, Any]:
    """The settings that make a row, with their fingerprint (12 hex digits of sha256)."""
    h = hashlib.sha256()
    for part in (trainer.encode(), _config_bytes(config), " ".join(sorted(overrides.split())).encode(),
                 str(seed or "").encode(), str(lr or "").encode()):
        h.update(part + b"\0")
    return {"init": init, "remedy": remedy, "seed": None if seed in (None, "") else int(seed), "config": config,
            "fingerprint": h.hexdigest()[:12]}


def _quantizer_options(config: Mapping[str, Any]) -> Mapping[str, Any]:
    params = ((config or {}).get("model") or {}).get("params") or {}
    return params.get("quantizer_config") or params.get("quantizer") or {}


def what_made(path: Path) -> dict[str, Any]:
    """The settings a record or a made_by.json says it was made with; old records: init and remedy from their
    saved config (``legacy: true``)."""
    data = json.loads(path.read_text())
    if "fingerprint" in data:  # a run folder's made_by.json
        return data
    made = (data.get("row") or {}).get("made_by")
    if made:
        return dict(made)
    q = _quantizer_options(data.get("config") or {})
    remedy = "plain" if not any(q.get(k) for k in REMEDY_KEYS) else "unknown"
    return {"init": q.get("codebook_init", "upstream"), "remedy": remedy, "legacy": True}


def differences(expect: Mapping[str, Any], got: Mapping[str, Any]) -> list[str]:
    """What differs between the settings asked for and those a record/run was made with ([] = the same)."""
    keys = ("init", "remedy") if got.get("legacy") else ("init", "remedy", "seed", "fingerprint")
    return [f"{k} {got.get(k)!r} (asked: {expect.get(k)!r})" for k in keys if got.get(k) != expect.get(k)]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("made-by")
    m.add_argument("--trainer", required=True, choices=["ldm", "enh"])
    m.add_argument("--config", required=True)
    m.add_argument("--overrides", default="")
    m.add_argument("--seed", default=None)
    m.add_argument("--lr", default=None)
    m.add_argument("--init", default="upstream")
    m.add_argument("--remedy", default="plain")
    c = sub.add_parser("check")
    c.add_argument("--expect", required=True, help="the made-by JSON of this invocation's row")
    c.add_argument("path", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "made-by":
        print(json.dumps(made_by(args.trainer, args.config, args.overrides, args.seed, args.lr, args.init,
                                 args.remedy), sort_keys=True))
        return 0
    try:
        got = what_made(args.path)
    except (OSError, ValueError) as err:
        # on stdout: reproduce.sh puts it in its one-line refusal
        print(f"cannot tell what made it ({type(err).__name__}: {err}; made by an older reproduce.sh?)")
        return 1
    diff = differences(json.loads(args.expect), got)
    if diff:
        print("; ".join(diff))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
