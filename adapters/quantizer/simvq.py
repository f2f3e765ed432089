"""SimVQ codebook (``codebook_param: simvq``; Zhu et al., "Addressing Representation Collapse in Vector Quantized
Models with One Linear Layer", ICCV 2025): the effective codebook is C W, a linear map of the stored one.

=================  ===============================================================================================
effective          E = C W^T row by row (``codebook_transform``, an ``nn.Linear(d, d, bias=False)``: state-dict key
                   ``codebook_transform.weight``), C the stored ``embedding.weight``. The search, both loss terms and
                   the output use E (normalised in ``use_norm`` mode); ``get_codebook_entry`` returns rows of E. Every
                   gradient step on W moves all codewords at once, which is the paper's remedy for collapse.
frozen C           as in the paper, C gets no gradient (``requires_grad=False``); ``simvq_learn_codebook: true``
                   trains it too.
start              W = I, so E starts as the stored codebook: an upstream or k-means init means the same as with
                   ``plain``, and a plain checkpoint's codebook is the same effective codebook. (The paper draws C from
                   a Gaussian and W as ``nn.Linear``'s default; vector-quantize-pytorch's ``SimVQ`` does the same.) A
                   k-means init sets C to the centres and W back to I.
refused            with ``remap`` (indices of a subset of E are not a SimVQ idea), with ``codebook_update: ema``
                   (the EMA would overwrite C, which W is meant to move, by averages of E-space vectors), and with
                   ``dead_code_threshold > 0`` (a restart sets a stored row to an encoder output, which under W is
                   not that output; solving C_k W^T = e needs W^-1).
=================  ===============================================================================================
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

CODEBOOK_PARAMS: tuple[str, ...] = ("plain", "simvq")


def check_codebook_param(codebook_param: str, simvq_learn_codebook: bool, remap: Optional[str],
                         codebook_update: str, dead_code_threshold: float) -> str:
    """Return ``codebook_param`` if it and its combination are valid, else raise one ValueError saying why."""
    if codebook_param not in CODEBOOK_PARAMS:
        raise ValueError(f"unknown codebook_param {codebook_param!r}: choose one of {', '.join(CODEBOOK_PARAMS)}")
    if codebook_param != "simvq":
        if simvq_learn_codebook:
            raise ValueError("simvq_learn_codebook applies only with codebook_param: simvq; remove it or set "
                             "codebook_param: simvq")
        return codebook_param
    if remap is not None:
        raise ValueError("codebook_param: simvq does not support remap (an index remapping of the codebook); "
                         "set remap: null or codebook_param: plain")
    if codebook_update != "gradient":
        raise ValueError("codebook_param: simvq trains W by gradient and codebook_update: ema would overwrite the "
                         "stored codebook: use codebook_update: gradient with simvq (or codebook_param: plain)")
    if dead_code_threshold > 0:
        raise ValueError("codebook_param: simvq does not support dead-code restarts (a restarted stored row is not "
                         "the encoder output once W maps it): set dead_code_threshold: 0 (or codebook_param: plain)")
    return codebook_param


def codebook_transform(dim: int, device: Optional[torch.device] = None,
                       dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """W: a bias-free d x d linear map starting at the identity (built without a draw from the global stream, so
    the run's random numbers are those of ``plain``)."""
    linear = nn.utils.skip_init(nn.Linear, dim, dim, bias=False, device=device or "cpu", dtype=dtype)
    reset_transform(linear)
    return linear


@torch.no_grad()
def reset_transform(linear: nn.Linear) -> None:
    """Set W back to the identity (after a k-means init has set the stored codebook)."""
    linear.weight.copy_(torch.eye(linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device))
