"""Server-side aggregation of client states (as Flower's ``aggregate.py``)."""

from __future__ import annotations

import torch


class WeightedAverage:
    """Sample-weighted running average of client states: two models' worth of memory at most.

    ``pooled_var`` maps running-variance keys to their running-mean keys; those variances are
    combined by the law of total variance (mean of variances + variance of means), which is
    the variance of the pooled data rather than an average of per-client spreads.
    Integer buffers (BatchNorm's ``num_batches_tracked``) take the maximum.
    """

    def __init__(self, pooled_var: dict[str, str] | None = None):
        self.pooled_var = pooled_var or {}
        self.sums: dict[str, torch.Tensor] = {}
        self.total = 0.0

    def add(self, state: dict[str, torch.Tensor], weight: float) -> None:
        for key, value in state.items():
            if not value.is_floating_point():
                contribution = value.detach()
            elif key in self.pooled_var:
                mean = state[self.pooled_var[key]].detach()
                contribution = (value.detach() + mean * mean) * weight
            else:
                contribution = value.detach() * weight
            if key not in self.sums:
                self.sums[key] = contribution.clone()
            elif value.is_floating_point():
                self.sums[key] += contribution
            else:
                torch.maximum(self.sums[key], contribution, out=self.sums[key])
        self.total += weight

    def result(self) -> dict[str, torch.Tensor]:
        if not self.total:
            raise ValueError("WeightedAverage.result: no client state was added")
        average = {k: v / self.total if v.is_floating_point() else v for k, v in self.sums.items()}
        for var_key, mean_key in self.pooled_var.items():
            average[var_key] = (average[var_key] - average[mean_key] ** 2).clamp_(min=0)
        return average
