"""Gating drift: how far training moved a model's structure away from the pretrained one.

FedSQ's premise is that the gating pattern (which regime each ReLU/ReLU6 unit is in) is
the structural knowledge worth keeping. ``gate_agreement`` measures, on a fixed probe batch,
the fraction of gate units in the same regime as in the pretrained reference: for FedAvg how
much training disturbed the structure. A FedSQ model's forward pass uses its frozen structural
copy's gates, the pretrained ones (agreement 1 by construction), so it is judged instead by
the gates its quantitative copy computes on its own: how far Q has moved from the regime
structure it is held to.
"""

from __future__ import annotations

import contextlib
import copy

from torch import Tensor, nn

from fedsq.dualcopy import ClampRegime, DualCopy, full_precision, record_regimes


@contextlib.contextmanager
def _in_eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _with_batchnorm_statistics_of(model: nn.Module, reference: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the reference's."""
    model = copy.deepcopy(model)
    reference_norms = dict(reference.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            source = reference_norms[name]
            module.running_mean.copy_(source.running_mean)
            module.running_var.copy_(source.running_var)
    return model


def _gate_codes(model: nn.Module, x: Tensor) -> list[Tensor]:
    with _in_eval_mode(model), full_precision(x.device.type):
        return [r.codes() for r in record_regimes(model, x) if isinstance(r, ClampRegime)]


def gate_agreement(model: nn.Module, reference: nn.Module, probe_x: Tensor, *, reference_bn: bool = False) -> float:
    """Fraction of gate units (over all call sites) whose regime on ``probe_x`` matches ``reference``'s.

    Both are evaluated in eval mode, in fp32 (``dualcopy.full_precision``). A DualCopy is judged by its quantitative copy run as a
    plain network, with its own gates (its forward pass uses the structural copy's).
    ``reference_bn=True`` evaluates ``model`` with the reference's BatchNorm statistics,
    separating drift of the weights from drift of the statistics.
    """
    gated = model.quantitative if isinstance(model, DualCopy) else model
    if reference_bn:
        gated = _with_batchnorm_statistics_of(gated, reference)
    codes = _gate_codes(gated, probe_x)
    reference_codes = _gate_codes(reference, probe_x)
    if [c.shape for c in codes] != [c.shape for c in reference_codes]:
        raise ValueError(
            f"model and reference have different gates ({len(codes)} vs {len(reference_codes)} call sites): not the same architecture"
        )
    agreeing = sum(int((a == b).sum()) for a, b in zip(codes, reference_codes))
    return agreeing / sum(c.numel() for c in codes)
