"""Checkpoints load without running code (adapters.runtime.safe_load); bad checkpoints, missing trees: one clear line.

- a crafted pickle that would run code is refused (the marker file it would write stays absent) with one line
  naming the file, the type and the opt-in; with the opt-in it loads (and the payload runs: it was real);
- what Lightning puts in checkpoints loads: a Lightning 2 checkpoint from a real ``pl.Trainer`` run (and Lightning's
  own resume reads it), Lightning-1.x-shaped dicts as numpy 1.x wrote them;
- ``scripts/evaluate.py``: untrusted checkpoint, checkpoint of another model, missing upstream tree -> one line;
- ``ckpt_path:`` / ``path:`` of both wrappers and of upstream's VQModel (patch 0010) go through the same loader.
"""
from __future__ import annotations

import argparse
import copy
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from adapters.runtime import safe_load
from adapters.runtime.errors import CheckpointMismatchError, UntrustedCheckpointError, UpstreamMissingError, UserError
from adapters.runtime.safe_load import load_checkpoint
from conftest import ROOT, requires_enhancing, requires_ldm

EVALUATE = ROOT / "scripts" / "evaluate.py"


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
class ExecPayload:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class SystemPayload:
    """Unpickling this runs ``os.system('touch marker')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


def pickle_globals(path: Path) -> set[str]:
    """'module name' of every GLOBAL in a torch zip checkpoint's pickle (read, not run)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def rename_globals(path: Path, renames: dict[str, str]) -> None:
    """Rewrite GLOBAL names in a torch zip checkpoint, e.g. numpy 2's 'numpy._core.multiarray' to numpy 1.x's
    'numpy.core.multiarray' (torch.save writes pickle protocol 2: GLOBAL opcodes are 'c<module>\\n<name>\\n')."""
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                for old, new in renames.items():
                    data = data.replace(f"c{old}\n".encode(), f"c{new}\n".encode())
            z.writestr(info, data)


# --------------------------------------------------------------------------------------------------------------
# Refusal and opt-in
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload, type_name", [(ExecPayload, "builtins.exec"), (SystemPayload, "system")])
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path: Path, payload: type,
                                                                   type_name: str) -> None:
    marker = tmp_path / "marker"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": payload(marker)}, ckpt)
    with pytest.raises(UntrustedCheckpointError) as info:
        load_checkpoint(ckpt, opt_in="pass --trust-me")
    message = str(info.value)
    assert isinstance(info.value, UserError) and info.value.one_line and "\n" not in message
    assert str(ckpt) in message and type_name in message and message.endswith("pass --trust-me")
    assert not marker.exists()  # nothing from the file ran


def test_a_legacy_format_checkpoint_is_refused_too(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    ckpt = tmp_path / "legacy.ckpt"
    torch.save({"extra": ExecPayload(marker)}, ckpt, _use_new_zipfile_serialization=False)
    with pytest.raises(UntrustedCheckpointError, match=r"legacy\.ckpt holds exec"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_trust_loads_the_untrusted_checkpoint_with_one_warning_line(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": ExecPayload(marker)}, ckpt)
    blob = load_checkpoint(ckpt, trust=True)
    assert torch.equal(blob["state_dict"]["w"], torch.ones(2))
    assert marker.read_text() == "ran"  # the payload was real: only the opt-in let it run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "builtins.exec" in err[0] and str(ckpt) in err[0]


def test_trust_loads_a_safe_checkpoint_safely_and_silently(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, ckpt)
    assert torch.equal(load_checkpoint(ckpt, trust=True)["state_dict"]["w"], torch.ones(2))
    assert capsys.readouterr().err == ""


def test_weights_only_copy_command(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    ckpt, copy_path = tmp_path / "evil.ckpt", tmp_path / "copy.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 5, "extra": ExecPayload(marker)}, ckpt)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    refused = subprocess.run([sys.executable, "-m", "adapters.runtime.safe_load", str(ckpt), str(copy_path)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--trust-checkpoint" in refused.stderr and not marker.exists()
    done = subprocess.run([sys.executable, "-m", "adapters.runtime.safe_load", str(ckpt), str(copy_path),
                           "--trust-checkpoint"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    blob = load_checkpoint(copy_path)  # the copy needs no opt-in
    assert set(blob) == {"state_dict", "global_step"} and blob["global_step"] == 5
    # a second copy to the same OUT, and a copy onto IN itself: one line each, nothing written (issue 23, item 6)
    before = copy_path.read_bytes(), ckpt.read_bytes()
    for target, message in ((copy_path, f"{copy_path} exists: pass --overwrite"), (ckpt, f"{ckpt} is {ckpt} itself")):
        again = subprocess.run([sys.executable, "-m", "adapters.runtime.safe_load", str(ckpt), str(target),
                                "--trust-checkpoint"], env=env, capture_output=True, text=True, timeout=120)
        lines = again.stderr.strip().splitlines()
        assert again.returncode == 2 and len(lines) == 1 and message in lines[0], again.stderr
    assert (copy_path.read_bytes(), ckpt.read_bytes()) == before


def _trusted_checkpoint(path: Path) -> bytes:
    """A Lightning-like checkpoint with more than weights (what a weights-only copy drops); returns its bytes."""
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 5, "optimizer_states": [{"state": {}}]}, path)
    return path.read_bytes()


@pytest.mark.parametrize("how", ["same path", "symlink", "other spelling", "hard link"])
def test_copy_refuses_to_write_over_its_input_even_with_overwrite(tmp_path: Path, how: str) -> None:
    ckpt = tmp_path / "run.ckpt"
    before = _trusted_checkpoint(ckpt)
    target = {"same path": ckpt, "symlink": tmp_path / "link.ckpt", "hard link": tmp_path / "hard.ckpt",
              "other spelling": tmp_path / "sub" / ".." / "run.ckpt"}[how]
    if how == "symlink":
        target.symlink_to(ckpt)
    elif how == "hard link":
        os.link(ckpt, target)
    elif how == "other spelling":
        (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match=r"itself: the copy keeps the weights only"):
        safe_load.main([str(ckpt), str(target), "--trust-checkpoint", "--overwrite"])
    assert ckpt.read_bytes() == before and set(load_checkpoint(ckpt)) == {"state_dict", "global_step",
                                                                          "optimizer_states"}


def test_copy_replaces_an_existing_out_only_with_overwrite(tmp_path: Path) -> None:
    ckpt, target = tmp_path / "run.ckpt", tmp_path / "copy.ckpt"
    _trusted_checkpoint(ckpt)
    target.write_bytes(b"an earlier file")
    with pytest.raises(UserError, match=r"copy\.ckpt exists: pass --overwrite to replace it"):
        safe_load.main([str(ckpt), str(target), "--trust-checkpoint"])
    assert target.read_bytes() == b"an earlier file"
    with pytest.raises(UserError, match="is a folder"):
        safe_load.main([str(ckpt), str(tmp_path), "--trust-checkpoint", "--overwrite"])
    safe_load.main([str(ckpt), str(target), "--trust-checkpoint", "--overwrite"])
    assert set(load_checkpoint(target)) == {"state_dict", "global_step"}


def test_copy_is_written_atomically(tmp_path: Path, monkeypatch) -> None:
    """A write that fails half-way (disk full, a kill) leaves no half file at OUT, an old OUT whole, and no
    temporary file behind."""
    ckpt, target, older = tmp_path / "run.ckpt", tmp_path / "copy.ckpt", tmp_path / "older.ckpt"
    _trusted_checkpoint(ckpt)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, older)
    before = older.read_bytes()

    def half_written(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        handle = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        handle.write(b"PK\x03\x04 half a file")
        handle.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        safe_load.main([str(ckpt), str(target), "--trust-checkpoint"])
    assert not target.exists()
    with pytest.raises(OSError, match="No space left"):
        safe_load.main([str(ckpt), str(older), "--trust-checkpoint", "--overwrite"])
    assert older.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["older.ckpt", "run.ckpt"]


def test_copy_refuses_non_finite_weights_in_one_line(tmp_path: Path) -> None:
    ckpt, target = tmp_path / "run.ckpt", tmp_path / "copy.ckpt"
    torch.save({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, ckpt)
    with pytest.raises(ValueError, match=r"holds non-finite weights \(w\): no copy written"):
        safe_load.main([str(ckpt), str(target), "--trust-checkpoint"])
    assert not target.exists()


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "nope.ckpt")


# --------------------------------------------------------------------------------------------------------------
# Allowlisted names have no side effects (issue 16, item 2)
# --------------------------------------------------------------------------------------------------------------
class Listener:
    """A local TCP server standing in for ftp://host:port: it counts connections and answers each with FTP's
    "421" (so a client that did connect fails at once instead of waiting for a greeting)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"ftp://127.0.0.1:{self.sock.getsockname()[1]}/runs/x"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.sendall(b"421 Service not available\r\n")
            conn.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.sock.close()


def write_raw_pickle(path: Path, data: bytes) -> None:
    """A torch zip checkpoint whose data.pkl is ``data`` (hand-written opcodes: what a crafted file can hold)."""
    torch.save({"x": 1}, path)
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, blob in entries:
            z.writestr(info, data if info.filename.endswith("data.pkl") else blob)


def crafted(name: str, how: str, url: str) -> bytes:
    """Protocol-2 pickle that builds the global ``name`` with ``url``: ``reduce`` calls name(url) (REDUCE),
    ``newobj`` runs name.__new__(name, url) (NEWOBJ), ``build`` runs name.__new__(name) and then sets the state
    {dirpath: url} (NEWOBJ + BUILD)."""
    module, _, attr = name.rpartition(".")
    push = f"c{module}\n{attr}\n".encode()
    args = lambda obj: pickle.dumps(obj, protocol=2)[2:-1]  # noqa: E731 (the opcodes, without PROTO and STOP)
    body = {"reduce": push + args((url,)) + pickle.REDUCE,
            "newobj": push + args((url,)) + pickle.NEWOBJ,
            "build": push + args(()) + pickle.NEWOBJ + args({"dirpath": url, "filename": url}) + pickle.BUILD}[how]
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def test_a_crafted_model_checkpoint_opens_no_connection_and_is_refused_in_one_line(tmp_path: Path,
                                                                                 listener: Listener) -> None:
    """The issue's reproduction: the real ModelCheckpoint(ftp://...) connects through fsspec while unpickling."""
    ckpt = tmp_path / "crafted.ckpt"
    write_raw_pickle(ckpt, crafted("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", "reduce",
                                   listener.url))
    assert safe_load.unsafe_globals(ckpt) == []  # only allowlisted names: the refusal must come from building it
    with pytest.raises(UntrustedCheckpointError) as info:
        load_checkpoint(ckpt, opt_in="pass --trust-me")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"checkpoint {ckpt} holds ") and "ModelCheckpoint" in message
    assert message.endswith("pass --trust-me")
    assert listener.connections == 0


ALLOWLISTED = sorted({name for _, name in safe_load.safe_globals()})


@pytest.mark.parametrize("how", ["reduce", "newobj", "build"])
@pytest.mark.parametrize("name", ALLOWLISTED)
def test_building_any_allowlisted_name_opens_no_connection(tmp_path: Path, listener: Listener, name: str,
                                                           how: str) -> None:
    """Every allowlisted name, built every way the weights-only unpickler allows, with an ftp:// argument: no
    connection, and the file either loads or is refused with the project's one line (never a raw error)."""
    ckpt = tmp_path / "crafted.ckpt"
    write_raw_pickle(ckpt, crafted(name, how, listener.url))
    try:
        load_checkpoint(ckpt)
    except UntrustedCheckpointError as err:
        assert "\n" not in str(err) and str(err).startswith(f"checkpoint {ckpt} holds ")
    assert listener.connections == 0


def test_the_model_checkpoint_stand_in_is_the_class_for_lookups_and_nothing_else() -> None:
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    stand_in = dict((name, obj) for obj, name in safe_load.safe_globals())[
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    assert stand_in is not ModelCheckpoint
    states = {stand_in: {"best_model_score": 1.0}}
    assert states[ModelCheckpoint] == {"best_model_score": 1.0}  # Lightning's _legacy_state_key lookup
    assert states.keys() - {ModelCheckpoint} == set() and {ModelCheckpoint} - states.keys() == set()
    with pytest.raises(pickle.UnpicklingError, match="builds a ModelCheckpoint object"):
        stand_in("ftp://127.0.0.1:1/x")
    with pytest.raises(pickle.UnpicklingError):
        stand_in.__new__(stand_in)


# --------------------------------------------------------------------------------------------------------------
# What Lightning checkpoints hold loads
# --------------------------------------------------------------------------------------------------------------
class TinyLit:
    """Factory for a tiny LightningModule whose checkpoints hold what upstream's hold: numpy floats from an lr
    schedule (LambdaLR over a numpy function, as ldm.lr_scheduler and enhancing.utils.scheduler), a ModelCheckpoint
    state and OmegaConf hyper-parameters."""

    @staticmethod
    def build(hparams: DictConfig) -> Any:
        import pytorch_lightning as pl

        class Module(pl.LightningModule):
            def __init__(self, cfg: DictConfig) -> None:
                super().__init__()
                self.save_hyperparameters(cfg)
                self.layer = torch.nn.Linear(4, 1)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                loss = self.layer(batch[0]).pow(2).mean()
                self.log("train/loss", loss)
                return loss

            def configure_optimizers(self) -> Any:
                opt = torch.optim.Adam(self.parameters(), lr=1e-3)
                schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: np.float64(np.cos(n / 100.0)))
                return [opt], [{"scheduler": schedule, "interval": "step"}]

        return Module(hparams)


def _fit(tmp_path: Path, module: Any, max_steps: int, ckpt_path: Any = None) -> Any:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor="train/loss")])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def test_a_lightning2_checkpoint_from_a_real_trainer_loads_and_resumes(tmp_path: Path) -> None:
    hparams = OmegaConf.create({"lr": 1e-3, "ddconfig": {"ch_mult": [1, 2], "z": "${lr}"}, "name": "tiny"})
    _fit(tmp_path, TinyLit.build(hparams), max_steps=3)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    # It really holds more than tensors: numpy scalars, OmegaConf containers (else this test proves nothing).
    held = pickle_globals(ckpt)
    assert {"numpy._core.multiarray scalar", "omegaconf.dictconfig DictConfig"} <= held, held
    blob = load_checkpoint(ckpt)
    assert blob["global_step"] == 3
    assert isinstance(blob["hyper_parameters"], DictConfig) and blob["hyper_parameters"].ddconfig.z == 1e-3
    assert isinstance(blob["lr_schedulers"][0]["_last_lr"][0], np.floating)
    assert any(k.startswith("ModelCheckpoint") for k in blob["callbacks"])
    # Lightning's own resume loads with weights_only=True through the registered allowlist.
    resumed = _fit(tmp_path, TinyLit.build(hparams), max_steps=5, ckpt_path=ckpt)
    assert resumed.global_step == 5


def _lightning1_checkpoint(hyper_parameters: Any) -> dict:
    """A Lightning 1.4-era checkpoint as latent-diffusion's main.py wrote it (callback states keyed by class)."""
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    return {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "1.4.2",
        "state_dict": OrderedDict([("encoder.weight", torch.arange(6.0).reshape(2, 3)),
                                   ("quantize.embedding.weight", torch.ones(4, 3))]),
        # Lightning < 1.5 keyed callback states by class, later versions by a string
        "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.5),
                                        "best_model_path": "logs/run/checkpoints/epoch=000002.ckpt",
                                        "current_score": torch.tensor(0.6), "dirpath": "logs/run/checkpoints"},
                      "ModelCheckpoint{'monitor': 'val/rec_loss'}": {"best_model_score": torch.tensor(1.0)}},
        "optimizer_states": [{"state": {0: {"step": 120, "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": np.float64(4.5e-6), "betas": (0.5, 0.9), "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [4.5e-6], "last_epoch": 120, "_step_count": 121,
                           "_last_lr": [np.float64(1e-6)], "lr_lambdas": [{"lr_min": np.float32(0.1),
                                                                         "warm_up_steps": np.int64(100)}],
                           "history": np.arange(3.0)}],
        "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters,
    }


def _attribute_dict(**items: Any) -> Any:
    from pytorch_lightning.utilities.parsing import AttributeDict
    return AttributeDict(**items)


@pytest.mark.parametrize("kind", ["AttributeDict", "Namespace", "DictConfig"])
def test_lightning1_shaped_checkpoints_load_as_numpy1_wrote_them(tmp_path: Path, kind: str) -> None:
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    ddconfig = {"ch": 128, "ch_mult": [1, 2, 2, 4], "dropout": 0.0}
    hp = {"AttributeDict": lambda: _attribute_dict(embed_dim=3, ddconfig=_attribute_dict(**ddconfig)),
          "Namespace": lambda: argparse.Namespace(embed_dim=3, ddconfig=ddconfig, base_lr=np.float64(4.5e-6)),
          "DictConfig": lambda: OmegaConf.create({"embed_dim": 3, "ddconfig": ddconfig})}[kind]()
    ckpt = tmp_path / "lightning1.ckpt"
    torch.save(_lightning1_checkpoint(hp), ckpt)
    rename_globals(ckpt, {"numpy._core.multiarray": "numpy.core.multiarray"})  # numpy 1.x's module path
    held = pickle_globals(ckpt)
    assert "numpy.core.multiarray scalar" in held and "numpy.core.multiarray _reconstruct" in held, held
    blob = load_checkpoint(ckpt)
    assert blob["global_step"] == 120
    assert torch.equal(blob["state_dict"]["encoder.weight"], torch.arange(6.0).reshape(2, 3))
    assert float(blob["callbacks"][ModelCheckpoint]["best_model_score"]) == 0.5
    assert blob["lr_schedulers"][0]["_last_lr"] == [1e-6] and blob["lr_schedulers"][0]["history"].tolist() == [0, 1, 2]
    hp_loaded = blob["hyper_parameters"]
    ch_mult = hp_loaded.ddconfig["ch_mult"] if kind != "AttributeDict" else hp_loaded["ddconfig"]["ch_mult"]
    assert list(ch_mult) == [1, 2, 2, 4] and (hp_loaded["embed_dim"] if kind == "AttributeDict"
                                              else hp_loaded.embed_dim) == 3


def test_one_allowlist_registered_once_and_shared_with_lightning_compat(monkeypatch) -> None:
    from adapters.integrations.lightning_compat import allow_numpy_scalars_in_checkpoints

    calls: list[list] = []
    monkeypatch.setattr(safe_load, "_registered", False)
    monkeypatch.setattr(torch.serialization, "add_safe_globals", lambda entries: calls.append(list(entries)))
    allow_numpy_scalars_in_checkpoints()
    allow_numpy_scalars_in_checkpoints()
    assert len(calls) == 1 and calls[0] == safe_load.safe_globals()
    names = {name for _, name in calls[0]}
    assert {"numpy.core.multiarray.scalar", "argparse.Namespace", "omegaconf.dictconfig.DictConfig",
            "pytorch_lightning.utilities.parsing.AttributeDict"} <= names
    assert not any(name.split(".")[0] in ("os", "subprocess", "sys") or name.endswith(("exec", "eval"))
                   for name in names)


# --------------------------------------------------------------------------------------------------------------
# scripts/evaluate.py: untrusted, mismatched
# --------------------------------------------------------------------------------------------------------------
def _evaluate(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, str(EVALUATE), *args, "--offline-photos", "--limit", "2", "--size", "16",
                           "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--no-fid", "--no-lpips",
                           "--offline", "--no-progress", "--examples", "0", "--out", str(tmp_path / "r.json")],
                          env=env, capture_output=True, text=True, timeout=300)


def _tiny_run(tmp_path: Path, extra: dict | None = None, n_embed: int = 16) -> tuple[Path, Path]:
    from test_eval_pipeline import TinyVQ

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"target": "test_eval_pipeline.TinyVQ", "params": {"n_embed": 16}}}))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": TinyVQ(n_embed=n_embed).state_dict(), **(extra or {})}, ckpt)
    return cfg, ckpt


def test_evaluate_refuses_an_untrusted_checkpoint_and_trusts_it_with_the_flag(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    cfg, ckpt = _tiny_run(tmp_path, {"extra": ExecPayload(marker)})
    refused = _evaluate(["--config", str(cfg), "--checkpoint", str(ckpt)], tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"evaluate.py: error: checkpoint {ckpt} holds builtins.exec")
    assert line.endswith("pass --trust-checkpoint (trust_checkpoint=True in Python)")
    assert not marker.exists() and not (tmp_path / "r.json").exists()

    trusted = _evaluate(["--config", str(cfg), "--checkpoint", str(ckpt), "--trust-checkpoint"], tmp_path)
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert marker.exists() and (tmp_path / "r.json").is_file()
    assert sum(line.startswith("warning: loading") for line in trusted.stderr.splitlines()) == 1


def test_evaluate_with_a_checkpoint_of_another_shape_is_one_line(tmp_path: Path) -> None:
    cfg, ckpt = _tiny_run(tmp_path, n_embed=32)
    res = _evaluate(["--config", str(cfg), "--checkpoint", str(ckpt)], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "size mismatch" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"evaluate.py: error: checkpoint {ckpt} does not fit the model of this config ({cfg})")
    assert "quantize.embedding.weight: checkpoint [32, 3] vs model [16, 3]" in line
    assert "logs/<run>/configs/*-project.yaml" in line


def test_a_vitvqgan_state_dict_on_a_vqgan_config_names_both_codebases(tmp_path: Path) -> None:
    from adapters import evaluation as E

    cfg, _ = _tiny_run(tmp_path)
    ckpt = tmp_path / "vit.ckpt"
    torch.save({"state_dict": {"pre_quant.weight": torch.zeros(8, 64), "quantizer.embedding.weight": torch.zeros(64, 8),
                               "encoder.to_patch_embedding.0.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(CheckpointMismatchError) as info:
        E.load_model(cfg, ckpt)
    message = str(info.value)
    assert "holds an enhancing-transformers ViT-VQGAN but the config builds a latent-diffusion/taming VQGAN" in message
    assert "model keys missing, e.g. encoder.0.weight" in message and isinstance(info.value, ValueError)


@requires_ldm
@requires_enhancing
def test_real_checkpoints_of_the_other_codebase_are_refused_both_ways(tmp_path: Path) -> None:
    from adapters import evaluation as E

    configs = {name: ROOT / "configs" / f"tiny_rot_{name}.yaml" for name in ("vqgan", "vitvqgan")}
    ckpts = {}
    for name, cfg in configs.items():
        ckpts[name] = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": E.load_model(cfg, None).model.state_dict()}, ckpts[name])
    for cfg_name, ckpt_name, text in (("vqgan", "vitvqgan", "holds an enhancing-transformers ViT-VQGAN"),
                                      ("vitvqgan", "vqgan", "holds a latent-diffusion/taming VQGAN")):
        with pytest.raises(CheckpointMismatchError, match=text) as info:
            E.load_model(configs[cfg_name], ckpts[ckpt_name])
        assert str(configs[cfg_name]) in str(info.value) and str(ckpts[ckpt_name]) in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# Missing upstream trees
# --------------------------------------------------------------------------------------------------------------
BLOCKER = """
import sys
class Blocker:
    '''Makes {pkg!r} unimportable, as without its tree (which stays in place).'''
    def find_spec(self, name, path=None, target=None):
        if name == {pkg!r} or name.startswith({pkg!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
"""


def _run_blocked(pkg: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", BLOCKER.format(pkg=pkg) + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("pkg, module, tree", [
    ("ldm", "adapters.integrations.ldm", "third_party/latent-diffusion"),
    ("enhancing", "adapters.integrations.vitvqgan", "third_party/enhancing-transformers")])
def test_importing_a_wrapper_without_its_upstream_names_the_tree(pkg: str, module: str, tree: str) -> None:
    res = _run_blocked(pkg, f"""
from adapters.runtime.errors import UpstreamMissingError
try:
    import {module}
except UpstreamMissingError as err:
    assert isinstance(err, ModuleNotFoundError) and err.name.startswith({pkg!r})
    print("ERROR:", err)
""")
    assert res.returncode == 0, res.stderr[-3000:]
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("ERROR:")]
    assert f"cannot import '{pkg}" in line and tree in line and "scripts/setup_submodules.sh" in line


def test_evaluate_without_the_latent_diffusion_tree_is_one_line(tmp_path: Path) -> None:
    argv = ["evaluate.py", "--config", str(ROOT / "configs" / "tiny_rot_vqgan.yaml"), "--checkpoint", "x.ckpt",
            "--out", str(tmp_path / "r.json")]
    res = _run_blocked("ldm", f"""
import runpy
sys.argv = {argv!r}
runpy.run_path({str(EVALUATE)!r}, run_name="__main__")
""")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("evaluate.py: error: cannot import 'ldm")
    assert "third_party/latent-diffusion" in line and "scripts/setup_submodules.sh" in line


def test_the_message_for_an_absent_tree(monkeypatch, tmp_path: Path) -> None:
    from adapters.integrations import upstream

    monkeypatch.setattr(upstream, "ROOT", tmp_path)  # a fresh clone: no third_party/ trees
    with pytest.raises(UpstreamMissingError) as info:
        with upstream.upstream_imports("ldm"):
            raise ModuleNotFoundError("No module named 'ldm'", name="ldm")
    assert str(info.value) == ("cannot import 'ldm': the upstream tree third_party/latent-diffusion is absent (a fresh "
                               "clone?). Run scripts/setup_submodules.sh to fetch and patch it")
    with pytest.raises(ModuleNotFoundError) as other:  # a dependency of the tree is not the tree's fault
        with upstream.upstream_imports("ldm"):
            raise ModuleNotFoundError("No module named 'einops'", name="einops")
    assert not isinstance(other.value, UpstreamMissingError)


# --------------------------------------------------------------------------------------------------------------
# ckpt_path: / path: in configs
# --------------------------------------------------------------------------------------------------------------
LDM_PARAMS = dict(n_embed=16, embed_dim=3,
                  ddconfig=dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32,
                                ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0),
                  lossconfig={"target": "adapters.integrations.losses.VQLPIPSWithDiscriminator",
                              "params": {"disc_start": 0, "perceptual_weight": 0.0, "disc_num_layers": 1,
                                         "disc_ndf": 8}})


@requires_ldm
def test_rotation_vqmodel_ckpt_path_refuses_unless_the_config_trusts_it(tmp_path: Path, capsys) -> None:
    from adapters.integrations.ldm import RotationVQModel

    marker = tmp_path / "marker"
    source = RotationVQModel(**copy.deepcopy(LDM_PARAMS))
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": source.state_dict(), "extra": ExecPayload(marker)}, ckpt)
    with pytest.raises(UntrustedCheckpointError, match="set model.params.trust_checkpoint: true$"):
        RotationVQModel(**copy.deepcopy(LDM_PARAMS), ckpt_path=str(ckpt))
    assert not marker.exists()
    model = RotationVQModel(**copy.deepcopy(LDM_PARAMS), ckpt_path=str(ckpt), trust_checkpoint=True)
    assert marker.exists() and "Restored from" in capsys.readouterr().out
    assert model.state_dict().keys() == source.state_dict().keys()  # the option is not a weight
    assert torch.equal(model.quantize.embedding.weight, source.quantize.embedding.weight)


@requires_ldm
def test_upstream_vqmodel_ckpt_path_loads_through_the_safe_loader(tmp_path: Path) -> None:
    """Patch 0010: a config targeting upstream's own VQModel gets the same loader (and refusal)."""
    from ldm.models.autoencoder import VQModel

    params = {**copy.deepcopy(LDM_PARAMS), "lossconfig": {"target": "torch.nn.Identity"}}
    source = VQModel(**copy.deepcopy(params))
    good, evil = tmp_path / "good.ckpt", tmp_path / "evil.ckpt"
    torch.save({"state_dict": source.state_dict(), "lr": np.float64(1e-4)}, good)
    torch.save({"state_dict": source.state_dict(), "extra": ExecPayload(tmp_path / "marker")}, evil)
    loaded = VQModel(**copy.deepcopy(params), ckpt_path=str(good))
    assert torch.equal(loaded.quantize.embedding.weight, source.quantize.embedding.weight)
    with pytest.raises(UntrustedCheckpointError, match="python -m adapters.runtime.safe_load"):
        VQModel(**copy.deepcopy(params), ckpt_path=str(evil))
    assert not (tmp_path / "marker").exists()


@requires_enhancing
def test_rotation_vitvq_path_refuses_unless_the_config_trusts_it(tmp_path: Path) -> None:
    from adapters.integrations.vitvqgan import RotationViTVQ

    params = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "tiny_rot_vitvqgan.yaml").model.params)
    marker = tmp_path / "marker"
    source = RotationViTVQ(**copy.deepcopy(params))
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": source.state_dict(), "extra": ExecPayload(marker)}, ckpt)
    with pytest.raises(UntrustedCheckpointError, match="set model.params.trust_checkpoint: true$"):
        RotationViTVQ(**copy.deepcopy(params), path=str(ckpt))
    assert not marker.exists()
    model = RotationViTVQ(**copy.deepcopy(params), path=str(ckpt), trust_checkpoint=True)
    assert marker.exists() and model.state_dict().keys() == source.state_dict().keys()
    assert torch.equal(model.quantizer.embedding.weight, source.quantizer.embedding.weight)
