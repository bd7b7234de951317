"""How BatchNorm running statistics are kept across clients (run config key ``bn``)."""

from __future__ import annotations

from torch import nn

from fedsq.client_store import ClientStore

POLICIES = ("pooled", "averaged", "frozen", "local")


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class BatchNormPolicy:
    """One of ``POLICIES``:

    pooled: a client's statistics become the exact average over its last local epoch
      (reset, then momentum 1/k at its k-th step, i.e. a cumulative mean), and the server pools them. With
      momentum 0.1 over a handful of local batches the plain running buffers stay near their
      initial values, and a model evaluated with them sits at chance although it learned.
    averaged: the momentum running buffers, averaged like any parameter (FedAvg as published).
    frozen: statistics keep their initial (pretrained) values; BatchNorm layers run in eval
      mode during local training, their affine parameters still train.
    local: FedBN; each client keeps its BatchNorm parameters and statistics (on disk); the
      global model carries their sample-weighted average for evaluation.
    """

    def __init__(self, name: str, model: nn.Module, store: ClientStore | None = None):
        if name not in POLICIES:
            raise ValueError(f"bn: {name!r} is not one of {list(POLICIES)}")
        if name == "local" and store is None:
            raise ValueError("bn: 'local' needs a ClientStore for the clients' BatchNorm layers")
        self.name, self.store = name, store
        self.layers = batchnorm_layers(model)
        self._momentum = {n: m.momentum for n, m in self.layers.items()}
        self._keys = [k for k in model.state_dict() if k.rpartition(".")[0] in self.layers]
        self._cumulative_steps: int | None = None  # steps of the cumulative mean so far; None: not averaging

    def pooled_var(self) -> dict[str, str]:
        if self.name != "pooled":
            return {}
        return {f"{n}.running_var": f"{n}.running_mean" for n, m in self.layers.items() if m.track_running_stats}

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.name == "frozen":
            for m in self.layers.values():
                m.eval()

    def client_begin(self, model: nn.Module, client: int, round: int) -> None:
        if self.name == "local":
            device = next(model.parameters()).device
            own = self.store.get(client, round, device=device)
            if own is not None:
                model.load_state_dict(own, strict=False)

    def epoch_begin(self, last: bool) -> None:
        if self.name == "pooled" and last:
            for m in self.layers.values():
                if m.track_running_stats:
                    m.reset_running_stats()
            self._cumulative_steps = 0

    def step_begin(self) -> None:
        """Before each training step's forward pass. The cumulative mean's momentum 1/k is counted
        here: BatchNorm's own (momentum=None) reads k from its num_batches_tracked buffer, a host
        sync per layer and step on a GPU. Same arithmetic as torch's (1.0 / float(k))."""
        if self._cumulative_steps is None:
            return
        self._cumulative_steps += 1
        for m in self.layers.values():
            if m.track_running_stats:
                m.momentum = 1.0 / self._cumulative_steps

    def client_end(self, model: nn.Module, client: int, round: int) -> None:
        self._cumulative_steps = None
        for n, m in self.layers.items():
            m.momentum = self._momentum[n]
        if self.name == "local":
            state = model.state_dict()
            self.store.put(client, round, {k: state[k] for k in self._keys})
