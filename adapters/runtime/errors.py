"""Errors the project raises for things a user must fix (one class each, shared by every module).

Every class here carries ``one_line = True``: the patched upstream ``main.py`` files print such an error as one
line (``main.py: <message>``) and exit 1 instead of printing a traceback, because the message already says what is
wrong and what to do.
"""
from __future__ import annotations


class UserError(RuntimeError):
    """Base: a problem the user fixes (bad input, missing file); the message says what is wrong and what to do."""

    one_line = True


class MissingWeightsError(UserError):
    """Pretrained network weights (LPIPS/VGG16, Inception-v3, AlexNet) are neither on disk nor downloadable.
    The message names the file, where it comes from and where to put it."""


class NonFiniteLossError(UserError):
    """A training loss became NaN or infinite: the run stops, naming the loss, the step and what to try."""


class UntrustedCheckpointError(UserError):
    """A checkpoint holds more than weights and the data types Lightning checkpoints hold, so loading it could run
    code from the file (``adapters.runtime.safe_load``). The message names the file, the types and the opt-in that
    trusts it."""


class UpstreamMissingError(UserError, ModuleNotFoundError):
    """An upstream package (``ldm``, ``enhancing``) cannot be imported: the message names its tree under
    ``third_party/`` and says to run ``scripts/setup_submodules.sh`` (``adapters.integrations.upstream``)."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's state dict does not fit the model its config builds (keys missing, shapes differ): the message
    names both files, what differs and which config to use instead."""
