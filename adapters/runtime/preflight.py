"""Checks a training run's config before anything heavy is built, reporting every problem at once, for both codebases.

latent-diffusion's ``main.py`` (patch 0018) calls :func:`exit_on_problems` right after merging the configs and the
command line; enhancing-transformers' ``main.py`` (patch 11) calls :func:`exit_on_enhancing_problems` right after
loading its config. Without them, a run on a machine lacking a GPU, the data or the LPIPS weights built the model
first and then stopped at the first of these problems, often in a long traceback; here each is one line saying what
to do (for enhancing's ``main.py``, with the command that fixes it).

Checked (cheaply: no model, no dataset scan, no download):

* latent-diffusion's command line, before any config is read (:func:`exit_on_command_line_problems`): a ``--base``
  config that is not a file, ``-r`` to something that is neither a run folder nor one of its checkpoints;
* trainer options Lightning's ``Trainer`` does not take (a misspelt ``lightning.trainer.max_step=60``);
* GPUs asked for (``--gpus`` / ``lightning.trainer.gpus``; enhancing's ``-ng N``) but torch sees none, or fewer;
* a local-ImageNet dataset (``adapters.evaluation.data.ImageNetFolder`` subclasses, enhancing's ones included) whose
  root or split folder is missing;
* LPIPS weights absent while ``perceptual_weight > 0`` (taming's two files; torchvision's VGG16 for enhancing's
  loss, whose upstream class builds LPIPS whatever the weight) and their host unreachable (or
  ``ROTATION_TRICK_OFFLINE=1``): the full configs would otherwise build the model before the download fails.

Not a problem but said once, as a note: ``--gpus 0`` is Lightning's count of no GPUs, a CPU run (GPU 0 is ``0,``).
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlparse

import torch

from adapters import canonical_target

PERCEPTUAL_OVERRIDE = "model.params.lossconfig.params.perceptual_weight=0"
# loss classes that build taming's LPIPS when perceptual_weight > 0 (taming's default weight is 1.0)
LPIPS_LOSSES = ("adapters.integrations.losses.VQLPIPSWithDiscriminator",
                "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                "taming.modules.losses.VQLPIPSWithDiscriminator")
# enhancing's loss classes -> whether perceptual_weight 0 spares LPIPS (the project's class; upstream's always builds it)
ENHANCING_LPIPS_LOSSES = {"adapters.integrations.vitvqgan.VQLPIPSWithDiscriminator": True,
                          "enhancing.losses.vqperceptual.VQLPIPSWithDiscriminator": False,
                          "enhancing.losses.vqperceptual.VQLPIPS": False}
ENHANCING_MAIN = "third_party/enhancing-transformers/main.py"


def _requested_gpus(gpus: Any) -> Optional[list[int] | int]:
    """Lightning 1.x ``gpus``: ``"0,"``/``"0,1"`` list ids, ``2`` counts devices; None/""/0 = CPU."""
    text = str(gpus).strip() if gpus is not None else ""
    if text in ("", "0", "None"):
        return None
    if "," in text:
        return [int(g) for g in text.split(",") if g.strip()]
    return int(text)


def gpu_problems(trainer_config: Mapping[str, Any]) -> list[str]:
    """One line when GPUs are asked for that torch cannot use."""
    try:
        wanted = _requested_gpus(trainer_config.get("gpus"))
    except ValueError:
        return [f"--gpus {trainer_config.get('gpus')!r} is not a GPU list (`0,` or `0,1`) or a count (`2`): fix it"]
    if wanted is None:
        return []
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    flag = f"--gpus {trainer_config.get('gpus')}"
    if have == 0:
        return [f"{flag} asks for a GPU but torch sees none (torch.cuda.is_available() is False): "
                "drop --gpus to train on the CPU, or run on a machine with a CUDA GPU"]
    ids = wanted if isinstance(wanted, list) else list(range(wanted))
    bad = [i for i in ids if i >= have]
    if bad:
        return [f"{flag} asks for GPU(s) {bad} but torch sees {have} (ids 0..{have - 1}): "
                "ask for fewer, or check CUDA_VISIBLE_DEVICES"]
    return []


def gpu_notes(trainer_config: Mapping[str, Any]) -> list[str]:
    """What ``--gpus 0`` means, since it reads like "GPU 0": Lightning's count of no GPUs, so a CPU run."""
    if str(trainer_config.get("gpus", "")).strip() != "0":
        return []
    return ["--gpus 0 means no GPU (a count of 0 GPUs, as in Lightning): this run trains on the CPU; "
            "for GPU 0 write --gpus 0, (with the comma)"]


# Lightning 1.x trainer options the patched main.py translates itself (patch 0003), on top of Trainer's own
LIGHTNING1_TRAINER_OPTIONS = ("gpus", "resume_from_checkpoint")


def trainer_problems(trainer_config: Mapping[str, Any]) -> list[str]:
    """One line per trainer option that ``Trainer`` does not take (it would raise a TypeError once the model is
    built), with the closest option it does take."""
    from pytorch_lightning import Trainer

    known = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    known += list(LIGHTNING1_TRAINER_OPTIONS)
    found = []
    for key in sorted(str(k) for k in trainer_config.keys() if str(k) not in known):
        close = difflib.get_close_matches(key, known, n=1)
        found.append(f"lightning.trainer.{key} is not a Lightning Trainer option" +
                     (f" (did you mean {close[0]}?)" if close else "") + ": fix the spelling")
    return found


def _runs_in(folder: Path) -> list[Path]:
    """Run folders of latent-diffusion's main.py directly under ``folder`` (they hold configs/*.yaml), oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and any((p / "configs").glob("*.yaml")))


def base_config_problems(paths: Sequence[str]) -> list[str]:
    """One line per ``--base`` config that is not a file, with the closest config beside where it was looked for."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            continue
        here = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, here, n=1)
        hint = (f"did you mean {path.parent / close[0]}?" if close else
                f"configs there: {', '.join(here)}" if here else f"{path.parent} holds no configs")
        found.append(f"--base {path}: no such file ({hint})")
    return found


def resume_problems(resume: str, logdir: str = "logs") -> list[str]:
    """One line when ``-r`` is neither a run folder of main.py (``configs/*.yaml``, ``checkpoints/last.ckpt``) nor a
    checkpoint in one (``<run>/checkpoints/<file>.ckpt``), saying which runs there are (``logdir``: main.py's ``-l``)."""
    if not resume:
        return []
    path = Path(resume)
    runs = _runs_in(Path(logdir))
    newest = f"; the newest run in {logdir}/ is {runs[-1]}" if runs else ""
    if not path.exists():
        return [f"-r {resume}: no such run folder or checkpoint{newest}"]
    run = path.parent.parent if path.is_file() else path
    if not any((run / "configs").glob("*.yaml")):
        inside = _runs_in(path) if path.is_dir() else []
        if inside:
            return [f"-r {resume} holds runs but is not one: give a run folder, e.g. -r {inside[-1]} (the newest)"]
        what = "a checkpoint in <run>/checkpoints/" if path.is_file() else "a run folder of main.py"
        return [f"-r {resume} is not {what} ({run / 'configs'} holds no *.yaml): -r takes a run folder "
                f"{logdir}/<time>_<config> or a checkpoint in its checkpoints/{newest}"]
    ckpt = path if path.is_file() else run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        from adapters.runtime.run_guard import CRASH  # kept apart on purpose: resumed from only when asked

        others = sorted(p for p in (run / "checkpoints").glob("*.ckpt") if p.name != CRASH)
        hint = (f"resume from one of its checkpoints, e.g. -r {others[-1]}" if others else
                "it saved no checkpoint: start it again with --base <its config>")
        return [f"-r {resume}: {ckpt} does not exist ({hint})"]
    return []


def name_problems(name: str, resume: str) -> list[str]:
    """One line for ``-n`` with ``-r``: ``-r`` goes on in the run's own folder, so a new name has no place; going on
    from the run's checkpoint in a new folder is ``--base`` its saved configs with ``--resume_from_checkpoint``."""
    if not (name and resume):
        return []
    path = Path(resume)
    run = path.parent.parent if path.is_file() else path
    ckpt = path if path.is_file() else run / "checkpoints" / "last.ckpt"
    return [f"-n {name} with -r {resume}: -r goes on in the run's own folder ({run}), so it takes no new name; to "
            f"go on from its checkpoint in a new folder, drop -r: --base {run / 'configs'}/*.yaml -n {name} "
            f"--resume_from_checkpoint {ckpt}"]


def exit_on_command_line_problems(base: Sequence[str], resume: str, logdir: str = "logs",
                                  prog: str = "main.py", name: str = "") -> None:
    """latent-diffusion's ``main.py``, before it reads any config: each ``--base``/``-r``/``-n`` problem as one line
    on stderr, exit 1 (upstream: a FileNotFoundError, ValueError or missing ``model`` key in a traceback)."""
    found = base_config_problems(base) + resume_problems(resume, logdir) + name_problems(name, resume)
    if found:
        _exit(found, prog)


def _dataset_configs(data_config: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    params = data_config.get("params") or {}
    return {split: params[split] for split in ("train", "validation", "test")
            if isinstance(params.get(split), Mapping) and "target" in params[split]}


def _import(target: str) -> Any:
    module, _, name = canonical_target(str(target)).rpartition(".")  # a saved config may name an old path
    return getattr(importlib.import_module(module), name)


def _imagenet_split(cls: type, params: Mapping[str, Any]) -> str:
    """The split folder a dataset config reads: its class's (``adapters.evaluation.data``'s and
    ``adapters.integrations.vitvqgan``'s are named ``ImageNetTrain`` / ``ImageNetValidation``), else ``split:``
    (``ImageNetFolder``'s default: train)."""
    from adapters.evaluation.data import ImageNetTrain, ImageNetValidation

    if issubclass(cls, ImageNetTrain) or cls.__name__.endswith("Train"):
        return "train"
    if issubclass(cls, ImageNetValidation) or cls.__name__.endswith("Validation"):
        return "val"
    return {"validation": "val"}.get(str(params.get("split", "train")), str(params.get("split", "train")))


def data_problems(data_config: Mapping[str, Any], section: str = "data") -> list[str]:
    """One line per missing local-ImageNet root or split folder (nothing is scanned). ``section``: where the datasets
    are in the config (latent-diffusion ``data``, whose lines are ``adapters.evaluation.data``'s messages; enhancing
    ``dataset``, whose lines give the ``export IMAGENET_ROOT=...`` command)."""
    from adapters.evaluation.data import IMAGENET_ROOT_ENV, DataError, ImageNetFolder, resolve_imagenet_root

    problems: list[str] = []
    for key, cfg in _dataset_configs(data_config).items():
        try:
            cls = _import(cfg["target"])
        except (ImportError, AttributeError, ValueError):
            continue  # instantiate_from_config reports it with its own message
        if not (isinstance(cls, type) and issubclass(cls, ImageNetFolder)):
            continue
        params = cfg.get("params") or {}
        where = f"{section}.params.{key}.params.root"
        try:
            folder = resolve_imagenet_root(params.get("root")) / _imagenet_split(cls, params)
        except DataError as err:
            unset = not params.get("root") and not os.environ.get(IMAGENET_ROOT_ENV)
            line = str(err) if section == "data" or not unset else (
                f"no ImageNet root: `export {IMAGENET_ROOT_ENV}=/path/to/imagenet` (a folder holding "
                f"train/<wnid>/*.JPEG and val/<wnid>/*.JPEG), or set {section}.params.<split>.params.root in the "
                "config; this project never downloads ImageNet")
        else:
            if folder.is_dir():
                continue
            line = f"{str(folder)!r} does not exist: an ImageNet root must hold {folder.name}/<wnid>/*.JPEG" + (
                " (point root: or $IMAGENET_ROOT at the folder holding train/ and val/)" if section == "data" else
                f": `export {IMAGENET_ROOT_ENV}=/path/to/imagenet` (the folder holding train/ and val/), or fix {where}")
        if line not in problems:  # train and validation usually share one root: say it once
            problems.append(line)
    return problems


def _can_download(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a connection (False at once under ``ROTATION_TRICK_OFFLINE=1``)."""
    from adapters.integrations.losses import OFFLINE_ENV

    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        return False
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def lpips_problems(model_config: Mapping[str, Any]) -> list[str]:
    """One line when the loss would build taming's LPIPS, its weight files are not on disk and their host cannot be
    reached (or ``ROTATION_TRICK_OFFLINE=1``)."""
    loss = (model_config.get("params") or {}).get("lossconfig") or {}
    if canonical_target(str(loss.get("target", ""))) not in LPIPS_LOSSES:  # a saved config may name an old path
        return []
    weight = float((loss.get("params") or {}).get("perceptual_weight", 1.0))
    if weight == 0:
        return []
    from adapters.integrations.losses import LPIPS_FILE, LPIPS_URL, VGG16_FILE, VGG16_URL, lpips_weight_paths

    urls = {VGG16_FILE: VGG16_URL, LPIPS_FILE: LPIPS_URL}
    missing = [f"{path} (from {urls[name]})" for name, path in lpips_weight_paths().items() if not path.is_file()]
    if not missing or _can_download(VGG16_URL):
        return []  # present, or taming downloads them when the loss is built
    return [f"perceptual_weight {weight:g} needs the LPIPS weights, missing: {'; '.join(missing)}: put them there, "
            f"or add {PERCEPTUAL_OVERRIDE} to train without LPIPS"]


def with_option(argv: Sequence[str], names: Sequence[str], value: str) -> list[str]:
    """``argv`` with option ``names`` (e.g. ``-ng``/``--num_gpus``) set to ``value``: replaced, or appended."""
    out, i, done = [], 0, False
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in names:
            out += [name, value]
            i += 1 if "=" in arg else 2
            done = True
            continue
        out.append(arg)
        i += 1
    return out if done else [*out, names[0], value]


def _command(argv: Sequence[str]) -> str:
    return "python " + " ".join(shlex.quote(a) for a in [ENHANCING_MAIN, *argv])


def enhancing_gpu_problems(num_gpus: int, argv: Sequence[str]) -> list[str]:
    """One line when ``-ng N`` asks for more GPUs than torch sees, with the command that runs instead."""
    if num_gpus <= 0:
        return []
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        return [f"-ng {num_gpus} asks for a GPU but torch sees none (torch.cuda.is_available() is False): train on the "
                f"CPU with `{_command(with_option(argv, ('-ng', '--num_gpus'), '0'))}`, or run on a machine with a "
                "CUDA GPU"]
    if num_gpus > have:
        return [f"-ng {num_gpus} asks for {num_gpus} GPUs but torch sees {have}: "
                f"`{_command(with_option(argv, ('-ng', '--num_gpus'), str(have)))}`, or check CUDA_VISIBLE_DEVICES"]
    return []


def enhancing_lpips_problems(model_config: Mapping[str, Any], config_name: str = "<config>") -> list[str]:
    """One line when enhancing's loss would build LPIPS, torchvision's VGG16 weights are not on disk and their host
    cannot be reached (or ``ROTATION_TRICK_OFFLINE=1``), with the command that puts them there."""
    loss = (model_config.get("params") or {}).get("loss") or {}
    target = canonical_target(str(loss.get("target", "")))  # a saved config may name an old path
    if target not in ENHANCING_LPIPS_LOSSES:
        return []
    weight = float((loss.get("params") or {}).get("perceptual_weight", 1.0))
    if weight == 0 and ENHANCING_LPIPS_LOSSES[target]:
        return []
    from adapters.integrations.losses import VGG16_FILE, VGG16_URL, lpips_weight_paths

    path = lpips_weight_paths()[VGG16_FILE]
    if path.is_file() or _can_download(VGG16_URL):
        return []
    instead = (f"or set model.params.loss.params.perceptual_weight: 0 in configs/{config_name}.yaml to train "
               "without LPIPS" if ENHANCING_LPIPS_LOSSES[target] else
               "or use target: adapters.integrations.vitvqgan.VQLPIPSWithDiscriminator with perceptual_weight: 0")
    return [f"perceptual_weight {weight:g} needs torchvision's VGG16 weights, missing at {path}: "
            f"`mkdir -p {shlex.quote(str(path.parent))} && curl -L -o {shlex.quote(str(path))} {VGG16_URL}` "
            f"where there is network (then copy the file here; TORCH_HOME moves the folder), {instead}"]


def enhancing_problems(config: Mapping[str, Any], num_gpus: int, argv: Sequence[str] = (),
                       config_name: str = "<config>") -> list[str]:
    """Every problem found in an enhancing-transformers config (``model``, ``dataset``) and its ``-ng``."""
    found = enhancing_gpu_problems(num_gpus, argv)
    if "dataset" in config:
        found += data_problems(config["dataset"], section="dataset")
    if "model" in config:
        found += enhancing_lpips_problems(config["model"], config_name)
    return found


def exit_on_missing_config(path: Path, prog: str = "main.py") -> None:
    """enhancing's ``main.py`` reads ``configs/<-c>.yaml`` from the working directory: one line when it is not there."""
    if path.is_file():
        return
    here = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
    where = f"configs here: {', '.join(here)}" if here else f"{Path.cwd()} has no configs/ folder: run from the project root"
    print(f"{prog}: {path} not found ({where})", file=sys.stderr)
    sys.exit(1)


def exit_on_enhancing_problems(config: Mapping[str, Any], num_gpus: int, config_name: str,
                               argv: Optional[Sequence[str]] = None, prog: str = "main.py") -> None:
    """enhancing's ``main.py``: print each problem as ``<prog>: <problem>`` on stderr and exit 1; else return.
    ``argv`` (default: this process's arguments) is what the suggested commands repeat."""
    argv = list(sys.argv[1:] if argv is None else argv)
    found = enhancing_problems(config, num_gpus, argv, config_name)
    if found:
        tiny = _command(["-c", "tiny_rot_vitvqgan", "-lr", "3e-4", "-e", "30", "-ng", "0", "-l", "csv"]) if Path("configs/tiny_rot_vitvqgan.yaml").is_file() \
            else None
        _exit(found, prog, f"an offline CPU run needing none of them: `{tiny}`" if tiny else None)


def _exit(found: list[str], prog: str, hint: Optional[str] = None) -> None:
    for line in found:
        print(f"{prog}: {line}", file=sys.stderr)
    print(f"{prog}: {len(found)} problem(s) above; nothing was built" + (f" ({hint})" if hint else ""),
          file=sys.stderr)
    sys.exit(1)


def problems(config: Mapping[str, Any], trainer_config: Mapping[str, Any]) -> list[str]:
    """Every problem found in a merged latent-diffusion config (``model``, ``data``) and its trainer options."""
    found = trainer_problems(trainer_config) + gpu_problems(trainer_config)
    if "data" in config:
        found += data_problems(config["data"])
    if "model" in config:
        found += lpips_problems(config["model"])
    return found


def exit_on_problems(config: Mapping[str, Any], trainer_config: Mapping[str, Any], prog: str = "main.py") -> None:
    """Print each problem as ``<prog>: <problem>`` on stderr and exit 1; return when there is none (after printing
    the notes, :func:`gpu_notes`, the same way)."""
    for line in gpu_notes(trainer_config):
        print(f"{prog}: {line}", file=sys.stderr)
    found = problems(config, trainer_config)
    if found:
        _exit(found, prog)


__all__ = ["PERCEPTUAL_OVERRIDE", "base_config_problems", "data_problems", "enhancing_gpu_problems",
           "enhancing_lpips_problems", "enhancing_problems", "exit_on_command_line_problems",
           "exit_on_enhancing_problems", "exit_on_missing_config", "exit_on_problems", "gpu_notes", "gpu_problems",
           "lpips_problems", "name_problems", "problems", "resume_problems", "trainer_problems", "with_option"]
