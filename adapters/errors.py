"""Errors the project raises for things a user must fix (one class each, shared by every module)."""
from __future__ import annotations


class MissingWeightsError(RuntimeError):
    """Pretrained network weights (LPIPS/VGG16, Inception-v3, AlexNet) are neither on disk nor downloadable.
    The message names the file, where it comes from and where to put it."""
