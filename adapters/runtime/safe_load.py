"""Loading checkpoint files without running code from them.

A ``.ckpt`` is a pickle, and ``torch.load(weights_only=False)`` calls whatever it names, so a third-party checkpoint
(the paper authors' released ones come from a file-sharing link) could run arbitrary code. :func:`load_checkpoint`
loads with ``weights_only=True`` plus the explicit allowlist in :func:`safe_globals`: what the Lightning 1.x and 2.x
checkpoints of both upstream codebases hold besides tensors, and nothing that runs code. A checkpoint needing more
is refused with one line (``UntrustedCheckpointError``) naming the file, the types and the opt-in that trusts it;
with the opt-in it loads with ``weights_only=False`` after a one-line warning. :func:`register_safe_globals` puts the
same list into ``torch.serialization``, so Lightning's own resume (``trainer.fit(ckpt_path=...)``, which loads with
``weights_only=True``) reads the same checkpoints.

How the list was found: ``torch.serialization.get_unsafe_globals_in_checkpoint`` of checkpoints written by both
upstream ``main.py`` files under Lightning 2 (with upstream's lr schedules), of a ``pl.Trainer`` run whose
hyper-parameters are a DictConfig / Namespace, and of Lightning-1.x-shaped dicts (``tests/test_safe_load.py``):
numpy scalars/dtypes/arrays, Lightning's ``AttributeDict``, ``argparse.Namespace``, path objects, OmegaConf
containers and their internals, and the ``ModelCheckpoint`` class (Lightning < 1.5 keyed callback states by class).
A name whose real object does more than build itself from data is allowlisted as an inert stand-in, never as the
real object: ``AttributeDict`` becomes a plain dict, and ``ModelCheckpoint`` a key that hashes and compares equal to
the class but refuses to be built (the real constructor opens ``dirpath`` through fsspec, which for ``ftp://...``
connects to a server). Whatever a file fails to build is refused with the same one line as an unknown type.
Not loadable without the opt-in: a ``defaultdict`` with items (torch sets items on exact dicts only; the empty one
OmegaConf pickles loads), structured-config dataclasses, enums, functions.

``python -m adapters.runtime.safe_load IN.ckpt OUT.ckpt --trust-checkpoint`` writes a weights-only copy of a checkpoint
you trust (``state_dict``, ``global_step``, ``epoch``), which then loads everywhere without the opt-in. It refuses an
OUT that is IN (under any path) and an existing OUT without ``--overwrite``, and writes OUT atomically (a temporary file
in OUT's folder, renamed over it).
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import pathlib
import pickle
import re
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from adapters.runtime.errors import UntrustedCheckpointError, UserError

# What the refusal tells a library caller to do; scripts and configs pass their own (a flag, a config key).
DEFAULT_OPT_IN = ("write a weights-only copy once with `python -m adapters.runtime.safe_load <file> <copy.ckpt> "
                  "--trust-checkpoint` and load the copy")
# numpy dtypes whose scalars and arrays may appear (lr schedules return float64; counters are ints).
NUMPY_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                "float32", "float64")

_registered = False


class _PlainDict:
    """Stand-in for Lightning's ``AttributeDict``: torch's weights-only unpickler sets items only on exact dicts,
    so building one (NEWOBJ or REDUCE) gives a plain ``dict`` with the same items (an ``AttributeDict`` only adds
    attribute access)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> dict:  # type: ignore[misc]
        return {}


class _ClassKeyMeta(type):
    """Metaclass of a stand-in for a class that checkpoints hold only as a dict key (never an instance of it).

    The stand-in hashes and compares equal to the real class, so a lookup by the real class (Lightning's legacy
    callback states, ``checkpoint["callbacks"][ModelCheckpoint]``) finds the entry; building it raises.
    """

    _real: type

    def __hash__(cls) -> int:
        return hash(cls._real)

    def __eq__(cls, other: object) -> bool:
        return other is cls or other is cls._real

    def __ne__(cls, other: object) -> bool:
        return not cls.__eq__(other)

    def __repr__(cls) -> str:
        return f"<stand-in for {cls._real.__module__}.{cls._real.__qualname__}>"


def _class_key(real: type) -> type:
    """An inert stand-in for ``real`` (see ``_ClassKeyMeta``): naming it is allowed, building it is refused."""

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        # torch's unpickler builds through REDUCE (cls(*args)) and NEWOBJ (cls.__new__(cls, *args)): both land here.
        # UnpicklingError makes torch.load report it as a weights-only refusal.
        raise pickle.UnpicklingError(f"the file builds a {real.__qualname__} object; checkpoints hold that class only "
                                     "as a key, and building one can open files or network connections")

    return _ClassKeyMeta(real.__qualname__, (), {"_real": real, "__new__": __new__, "__module__": real.__module__,
                                                 "__doc__": f"Inert stand-in for {real.__qualname__}."})


@functools.lru_cache(maxsize=None)  # one stand-in per process: torch's allowlist and equality need the same object
def _model_checkpoint_key() -> type:
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    return _class_key(ModelCheckpoint)


def safe_globals() -> list[tuple[Any, str]]:
    """The allowlist: (object, the name a pickle refers to it by). Classes here are only built and filled with
    data; none of them runs code from the file (the functions build numpy scalars and arrays from bytes), and none
    has a side effect when built (no file, no connection): where the real class would, an inert stand-in is
    listed instead (``_PlainDict``, ``_class_key``)."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 moved it
    entries: list[tuple[Any, str]] = []
    # numpy scalars, dtypes and arrays: upstream lr schedules return numpy floats, which land in the optimizer and
    # scheduler states. numpy 1.x pickles them as numpy.core.*, numpy 2 as numpy._core.*.
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries += [(multiarray.scalar, f"{prefix}.scalar"), (multiarray._reconstruct, f"{prefix}._reconstruct")]
    entries += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for name in NUMPY_DTYPES:  # a dtype is rebuilt, then its state set: its class must be allowed too
        cls = type(np.dtype(name))
        entries.append((cls, f"{cls.__module__}.{cls.__qualname__}"))
    # Lightning hyper-parameters: AttributeDict (under each package path Lightning has used) and argparse.Namespace.
    for path in ("pytorch_lightning.utilities.parsing", "lightning.pytorch.utilities.parsing",
                 "lightning_fabric.utilities.data", "lightning.fabric.utilities.data"):
        entries.append((_PlainDict, f"{path}.AttributeDict"))
    entries.append((argparse.Namespace, "argparse.Namespace"))
    # Paths among hyper-parameters and callback states (a path object is built from strings; no file is touched).
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        names = {f"pathlib.{cls.__qualname__}", f"{cls.__module__}.{cls.__qualname__}"}  # 3.13: pathlib._local
        entries += [(cls, name) for name in sorted(names)]
    # Lightning < 1.5 keyed callback states by the callback class (both upstream main.py files use ModelCheckpoint);
    # Lightning's own checkpoint migration looks them up by that class. The real class is not listed: its
    # constructor opens dirpath through fsspec (ftp://host/x connects), and a pickle may call it with any argument.
    entries.append((_model_checkpoint_key(), "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"))
    # OmegaConf configs as hyper-parameters, and what they pickle: metadata, value nodes, the types the metadata
    # names, and the (empty) defaultdict of the resolver cache.
    for cls in (DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode):
        entries.append((cls, f"{cls.__module__}.{cls.__qualname__}"))
    entries += [(typing.Any, "typing.Any"), (dict, "builtins.dict"), (list, "builtins.list"), (int, "builtins.int"),
                (collections.defaultdict, "collections.defaultdict")]
    return entries


def register_safe_globals() -> None:
    """Add the allowlist to ``torch.serialization``'s safe globals (idempotent), for every ``weights_only`` load."""
    global _registered
    if not _registered:
        torch.serialization.add_safe_globals(safe_globals())
        _registered = True


def unsafe_globals(path: str | os.PathLike) -> Optional[list[str]]:
    """Names a checkpoint's pickle refers to beyond torch's defaults and the allowlist (read, not run); None when the
    file is not in torch's zip format (legacy files: torch.load's refusal names the first one)."""
    register_safe_globals()
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not torch's zip format, or unreadable: torch.load says what is wrong
        return None


def _refusal_reason(err: pickle.UnpicklingError) -> Optional[str]:
    """What torch's weights-only unpickler refused, from its message (None: not a weights-only refusal)."""
    text = str(err)
    if "Weights only load failed" not in text:
        return None
    found = re.findall(r"GLOBAL (\S+) was not an allowed global", text) or re.findall(r"got <class '([^']+)'>", text)
    if found:
        return ", ".join(dict.fromkeys(found))
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    return f"pickle content the weights-only unpickler does not support ({detail[0] if detail else 'no detail'})"


def _raised_while_unpickling(err: BaseException) -> bool:
    """True when ``err`` came out of torch's weights-only unpickler (building the file's objects), not out of
    reading the archive or the tensors."""
    from torch import _weights_only_unpickler  # torch.load(weights_only=True) runs its Unpickler

    where = os.path.normcase(os.path.abspath(_weights_only_unpickler.__file__))
    tb = err.__traceback__
    while tb is not None:
        if os.path.normcase(os.path.abspath(tb.tb_frame.f_code.co_filename)) == where:
            return True
        tb = tb.tb_next
    return False


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False, opt_in: str = DEFAULT_OPT_IN,
                    map_location: Any = "cpu") -> Any:
    """``torch.load(path)`` without running code from the file: ``weights_only=True`` plus :func:`safe_globals`.

    A checkpoint that needs anything else, or that builds an allowlisted type in a way no real checkpoint does,
    raises ``UntrustedCheckpointError`` (one line: the file, what it holds, ``opt_in`` = how the caller's user
    trusts it). ``trust=True`` loads such a file with ``weights_only=False`` after a one-line warning on stderr;
    files within the allowlist load safely either way. Lightning's ``AttributeDict`` comes back as a plain dict
    (same items), a legacy ``ModelCheckpoint`` key as a stand-in equal to the class.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    unsafe = unsafe_globals(path)  # also registers the allowlist
    reason = ", ".join(unsafe) if unsafe else None
    if reason is None:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = _refusal_reason(err)
            if reason is None:
                raise
        except Exception as err:
            # An allowlisted class called with arguments no real checkpoint passes (a Namespace with positional
            # arguments, a WindowsPath on Linux, ...) raises its own error: still a file we refuse, in one line.
            if not _raised_while_unpickling(err):
                raise
            detail = (str(err).strip().splitlines() or [""])[0][:160]
            reason = f"pickle content the weights-only unpickler cannot rebuild ({type(err).__name__}: {detail})"
    if not trust:
        raise UntrustedCheckpointError(
            f"checkpoint {path} holds {reason}, which torch.load(weights_only=True) refuses: unpickling it can run "
            f"code from the file. If you trust where it came from, {opt_in}")
    print(f"warning: loading {path} with weights_only=False as you trust it: it holds {reason}, and its pickle can "
          f"run arbitrary code", file=sys.stderr)
    return torch.load(path, map_location=map_location, weights_only=False)


def _check_copy_target(source: Path, target: Path, overwrite: bool) -> None:
    """Refuse a copy that would destroy ``source`` (the same file under any path: symlinks, hard links) or replace
    an existing ``target`` without ``overwrite``."""
    if target.is_dir():
        raise UserError(f"{target} is a folder: name the copy's file")
    if not (target.exists() or target.is_symlink()):
        return
    if source.exists() and os.path.samefile(source, target):
        raise UserError(f"{target} is {source} itself: the copy keeps the weights only, so writing it there would "
                        "lose the rest of the checkpoint (optimizer and scheduler state): name another file")
    if not overwrite:
        raise UserError(f"{target} exists: pass --overwrite to replace it, or name another file")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m adapters.runtime.safe_load IN OUT --trust-checkpoint``: a weights-only copy of a trusted file."""
    from adapters.runtime.run_guard import AtomicCheckpointIO, nonfinite_keys

    p = argparse.ArgumentParser(prog="python -m adapters.runtime.safe_load", description=main.__doc__)
    p.add_argument("checkpoint", help="the checkpoint to copy (loaded with weights_only=False if it needs to be)")
    p.add_argument("out", help="where to write the copy: state_dict, global_step and epoch only (never IN itself)")
    p.add_argument("--trust-checkpoint", action="store_true", required=True,
                   help="required: you trust the file, which may run code when loaded")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    source, target = Path(args.checkpoint), Path(args.out)
    _check_copy_target(source, target, args.overwrite)  # before loading: a refused copy reads nothing
    blob = load_checkpoint(source, trust=args.trust_checkpoint, opt_in="pass --trust-checkpoint")
    sd = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {source} holds no state dict ('state_dict' of tensors)")
    bad = nonfinite_keys(sd)
    if bad:  # the writer below refuses such weights (and would only warn): say it here, in one line
        more = ", ..." if len(bad) == 3 else ""  # nonfinite_keys names at most 3
        raise ValueError(f"checkpoint {source} holds non-finite weights ({', '.join(bad)}{more}): no copy written")
    copy = {"state_dict": dict(sd), **{k: blob[k] for k in ("global_step", "epoch") if k in blob}}
    # temporary file in OUT's folder, then renamed over OUT: a failed or stopped write leaves OUT as it was
    AtomicCheckpointIO().save_checkpoint(copy, target)
    print(f"{target}: {len(sd)} tensors from {source}, loadable with weights_only=True")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, UserError) as err:
        print(f"safe_load: error: {err}", file=sys.stderr)
        sys.exit(2)
