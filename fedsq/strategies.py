"""Federated methods: what a client adds to its local training, and how the server combines.

In the style of Flower's strategies, one small class per method; the engine owns the loop
and calls these hooks, in this order, around the local training of each sampled client:

- ``wrap(model)``: the model form clients train (fedsq: DualCopy); once per run.
- ``bind(model)``: allocate server state shaped like the trainable parameters; once per run.
- ``client_begin(model, client, round, global_state)``: the model holds the global state.
- ``client_grad(params)``: after backward, before the optimizer step (proximal term, SCAFFOLD).
- ``client_end(model, client, round, steps, lr, momentum, global_state)``: after local
  training, which took ``steps`` steps of a fresh ``torch.optim.SGD(lr=lr, momentum=momentum)``.
- ``server_update(global_state, average)``: the new global state from the sample-weighted
  average of the clients' states (``WeightedAverage``).

Only ``model.state_dict()`` and the trainable ``model.named_parameters()`` are touched, so a
DualCopy's frozen structural copy is neither trained nor aggregated. Per-client state
(SCAFFOLD's control variates, FedBN's BatchNorm layers) lives on disk in a ``ClientStore``,
so memory does not grow with the number of clients.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

BN_POLICIES = ("pooled", "averaged", "frozen", "local")


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class ClientStore:
    """Per-client tensors on disk, one file per client and round.

    A client's state is read as "the latest version written before round r", so redoing an
    interrupted round (resume) reads what the uninterrupted run read. Old versions go only
    once a checkpoint makes them unreadable (``prune``): training may run rounds ahead of the
    checkpoint on disk, and a version its resume still needs must outlive those rounds.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def _versions(self, client: int) -> list[int]:
        folder = self.root / f"client{client}"
        if not folder.is_dir():
            return []
        return sorted(int(f.stem.removeprefix("round")) for f in folder.glob("round*.pt"))

    def get(self, client: int, before_round: int, device: torch.device | str = "cpu") -> dict | None:
        earlier = [v for v in self._versions(client) if v < before_round]
        if not earlier:
            return None
        path = self.root / f"client{client}" / f"round{earlier[-1]}.pt"
        return torch.load(path, map_location=device, weights_only=True)

    def put(self, client: int, round: int, state: dict[str, torch.Tensor]) -> None:
        folder = self.root / f"client{client}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"round{round}.pt.tmp"
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
        os.replace(tmp, folder / f"round{round}.pt")

    def prune(self, checkpointed_round: int) -> None:
        """Delete the versions a run resumed after ``checkpointed_round`` can no longer read:
        per client, all but the newest up to that round (later ones are kept)."""
        for folder in self.root.glob("client*"):
            client = int(folder.name.removeprefix("client"))
            readable = [v for v in self._versions(client) if v <= checkpointed_round]
            for stale in readable[:-1]:
                (folder / f"round{stale}.pt").unlink()


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


class BatchNormPolicy:
    """How BatchNorm running statistics are kept across clients (config key ``bn``).

    pooled: a client's statistics become the exact average over its last local epoch
      (reset, then momentum=None, i.e. a cumulative mean), and the server pools them. With
      momentum 0.1 over a handful of local batches the plain running buffers stay near their
      initial values, and a model evaluated with them sits at chance although it learned.
    averaged: the momentum running buffers, averaged like any parameter (FedAvg as published).
    frozen: statistics keep their initial (pretrained) values; BatchNorm layers run in eval
      mode during local training, their affine parameters still train.
    local: FedBN; each client keeps its BatchNorm parameters and statistics (on disk); the
      global model carries their sample-weighted average for evaluation.
    """

    def __init__(self, name: str, model: nn.Module, store: ClientStore | None = None):
        if name not in BN_POLICIES:
            raise ValueError(f"bn: {name!r} is not one of {list(BN_POLICIES)}")
        if name == "local" and store is None:
            raise ValueError("bn: 'local' needs a ClientStore for the clients' BatchNorm layers")
        self.name, self.store = name, store
        self.layers = batchnorm_layers(model)
        self._momentum = {n: m.momentum for n, m in self.layers.items()}
        self._keys = [k for k in model.state_dict() if k.rpartition(".")[0] in self.layers]

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
                    m.momentum = None

    def client_end(self, model: nn.Module, client: int, round: int) -> None:
        for n, m in self.layers.items():
            m.momentum = self._momentum[n]
        if self.name == "local":
            state = model.state_dict()
            self.store.put(client, round, {k: state[k] for k in self._keys})


class FedAvg:
    """McMahan et al. 2017: the new global model is the sample-weighted client average.

    ``mu > 0`` adds FedProx's proximal term (mu/2)·||w - w_global||², applied as its gradient
    mu·(w - w_global) so no extra autograd graph is built; every method composes with it.
    """

    name = "fedavg"

    def __init__(self, options: dict, store: ClientStore | None = None, num_clients: int = 1):
        self.mu = float(options.get("mu") or 0.0)
        self.store, self.num_clients = store, num_clients
        self._anchor: list[torch.Tensor] = []

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def bind(self, model: nn.Module) -> None:
        """Allocate server state shaped like the model's trainable parameters."""

    def client_begin(self, model: nn.Module, client: int, round: int, global_state: dict) -> None:
        if self.mu:
            self._anchor = [global_state[name] for name, _ in trainable(model)]

    def client_grad(self, params: list[nn.Parameter]) -> None:
        if self.mu:
            for p, anchor in zip(params, self._anchor):
                p.grad.add_(p.detach() - anchor, alpha=self.mu)

    def client_end(self, model: nn.Module, client: int, round: int, steps: int, lr: float, momentum: float,
                   global_state: dict) -> None:
        pass

    def server_update(self, global_state: dict, average: dict) -> dict:
        return average

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg plus the proximal term (``mu``, default 0.01)."""

    name = "fedprox"


def _device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device``: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class FedSQ(FedAvg):
    """Clients train the quantitative copy of a DualCopy whose gates come from the frozen
    pretrained structural copy; only that copy is in ``state_dict``, hence aggregated.

    ``regime_cache``: the structural copy's regimes of every sample are computed once
    (``dualcopy.RegimeCache``) instead of in every forward pass: always (true), never (false),
    or when they fit in ``regime_cache_budget`` of the device's memory (auto).
    """

    name = "fedsq"

    def __init__(self, options: dict, store: ClientStore | None = None, num_clients: int = 1):
        super().__init__(options, store, num_clients)
        self.gate_maxpool = bool(options.get("gate_maxpool", False))
        self.regime_cache = options.get("regime_cache", "auto")
        self.regime_cache_budget = float(options.get("regime_cache_budget", 0.25))

    def wrap(self, model: nn.Module) -> nn.Module:
        from fedsq.dualcopy import DualCopy

        return DualCopy(model, gate_maxpool=self.gate_maxpool)

    def regime_caches(self, model: nn.Module, splits: dict[str, torch.Tensor],
                      inputs: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> dict:
        """A ``RegimeCache`` per split (``splits``: its samples as stored, ``inputs`` makes model
        inputs of them), or {} where the regimes are to be computed live."""
        from fedsq.dualcopy import RegimeCache

        if self.regime_cache is False:
            return {}
        if self.regime_cache == "auto":
            first = next(iter(splits.values()))
            need = RegimeCache(model, [inputs(first[:1])], 1).nbytes * sum(len(x) for x in splits.values())
            budget = self.regime_cache_budget * _device_memory(first.device)
            if need > budget:
                warnings.warn(
                    f"method.regime_cache: the regime cache would take {need / 2**20:.0f} MiB, over its budget of "
                    f"{budget / 2**20:.0f} MiB (method.regime_cache_budget: {self.regime_cache_budget} of the "
                    "device's memory); computing the regimes in every forward pass instead", stacklevel=2)
                return {}
        return {name: RegimeCache(model, (inputs(x[i:i + batch_size]) for i in range(0, len(x), batch_size)), len(x))
                for name, x in splits.items()}


def displacement_per_gradient(steps: int, lr: float, momentum: float) -> float:
    """How far ``steps`` steps of torch's momentum SGD move a parameter per unit of a constant
    gradient: its buffer starts at the first gradient and after k steps holds
    g·(1 + β + … + β^(k-1)) = g·(1 - β^k)/(1 - β), and each step moves lr·buffer.

    lr·K for plain SGD. The steady-state lr·K/(1 - β) overstates it most for few steps
    (1/(1 - β) = 10× at K = 1, β = 0.9), and SCAFFOLD's c_i would be as many times too small.
    """
    return lr * sum(1 - momentum**k for k in range(1, steps + 1)) / (1 - momentum)


class Scaffold(FedAvg):
    """Karimireddy et al. 2020, option II control variates.

    Local gradients are corrected by (c - c_i); after local training the client's variate
    becomes c_i⁺ = c_i - c + (x - y_i)/D, where D = ``displacement_per_gradient`` (Kη for K
    plain SGD steps of size η), so that a constant gradient is recovered exactly; the server
    moves c by the sum of the clients' changes over the number of all clients. c_i lives in
    the ClientStore.
    """

    name = "scaffold"

    def __init__(self, options: dict, store: ClientStore | None = None, num_clients: int = 1):
        super().__init__(options, store, num_clients)
        if store is None:
            raise ValueError("method.name: scaffold needs a ClientStore for the client control variates")
        self.c: dict[str, torch.Tensor] = {}
        self._delta: dict[str, torch.Tensor] = {}

    def bind(self, model: nn.Module) -> None:
        self.c = {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name, p in trainable(model)}
        self._delta = {name: torch.zeros_like(v) for name, v in self.c.items()}

    def client_begin(self, model: nn.Module, client: int, round: int, global_state: dict) -> None:
        super().client_begin(model, client, round, global_state)
        device = next(iter(self.c.values())).device
        self._c_i = self.store.get(client, round, device=device) or {n: torch.zeros_like(v) for n, v in self.c.items()}
        self._correction = [self.c[n] - self._c_i[n] for n in self.c]

    def client_grad(self, params: list[nn.Parameter]) -> None:
        super().client_grad(params)
        for p, correction in zip(params, self._correction):
            p.grad.add_(correction)

    def client_end(self, model: nn.Module, client: int, round: int, steps: int, lr: float, momentum: float,
                   global_state: dict) -> None:
        divisor = displacement_per_gradient(steps, lr, momentum)
        new_c_i = {}
        for name, p in trainable(model):
            new_c_i[name] = self._c_i[name] - self.c[name] + (global_state[name] - p.detach()) / divisor
            self._delta[name] += new_c_i[name] - self._c_i[name]
        self.store.put(client, round, new_c_i)

    def server_update(self, global_state: dict, average: dict) -> dict:
        for name in self.c:
            self.c[name] += self._delta[name] / self.num_clients
            self._delta[name].zero_()
        return average

    def state_dict(self) -> dict:
        return {"c": self.c}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["c"].items():
            self.c[name].copy_(value)


class _ServerOptimizer(FedAvg):
    """Reddi et al. 2021 (Adaptive Federated Optimization), Algorithm 2: the server moves each
    trainable parameter by a function of Δ = average - global (the pseudo-gradient is -Δ) and
    of per-parameter buffers, which the checkpoint keeps; other entries (BatchNorm statistics)
    take the average as in FedAvg."""

    def bind(self, model: nn.Module) -> None:
        self.buffers = {name: self.initial_buffers(p.detach()) for name, p in trainable(model)}

    def initial_buffers(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step(self, delta: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """The move of one parameter; updates its ``buffers`` in place."""
        raise NotImplementedError

    def server_update(self, global_state: dict, average: dict) -> dict:
        new_state = dict(average)
        for name, buffers in self.buffers.items():
            new_state[name] = global_state[name] + self.step(average[name] - global_state[name], buffers)
        return new_state

    def state_dict(self) -> dict:
        return {"buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        for name, buffers in state["buffers"].items():
            for key, value in buffers.items():
                self.buffers[name][key].copy_(value)


class FedAvgM(_ServerOptimizer):
    """Hsu et al. 2019: server SGD with momentum (``server_lr``, ``server_momentum``)."""

    name = "fedavgm"

    def __init__(self, options: dict, store: ClientStore | None = None, num_clients: int = 1):
        super().__init__(options, store, num_clients)
        self.server_lr, self.momentum = float(options.get("server_lr") or 1.0), float(options["server_momentum"])

    def initial_buffers(self, p):
        return {"m": torch.zeros_like(p)}

    def step(self, delta, buffers):
        # torch.optim.SGD's momentum on the pseudo-gradient -Δ (its buffer starts at the first one)
        return self.server_lr * buffers["m"].mul_(self.momentum).add_(delta)


class FedAdam(_ServerOptimizer):
    """Reddi et al. 2021, Algorithm 2's FedAdam (``server_lr`` η, ``betas``, ``tau`` τ):
    m_t = β1·m_{t-1} + (1-β1)·Δ_t, v_t = β2·v_{t-1} + (1-β2)·Δ_t², x_{t+1} = x_t + η·m_t/(√v_t + τ).

    No bias correction, as published: torch.optim.Adam's would rescale the k-th server step by
    √(1-β2^k)/(1-β1^k) (0.74 at the second with betas 0.9, 0.99).
    """

    name = "fedadam"

    def __init__(self, options: dict, store: ClientStore | None = None, num_clients: int = 1):
        super().__init__(options, store, num_clients)
        self.server_lr, self.betas, self.tau = (
            float(options.get("server_lr") or 0.01), tuple(options["betas"]), float(options["tau"]))

    def initial_buffers(self, p):
        # Algorithm 2 starts from m_{-1} = 0 and requires v_{-1} ≥ τ²: τ², its least value, is
        # the start closest to v = 0 that it allows (and it decays by β2 each round).
        return {"m": torch.zeros_like(p), "v": torch.full_like(p, self.tau**2)}

    def step(self, delta, buffers):
        beta1, beta2 = self.betas
        m = buffers["m"].mul_(beta1).add_(delta, alpha=1 - beta1)
        v = buffers["v"].mul_(beta2).addcmul_(delta, delta, value=1 - beta2)
        return self.server_lr * m / (v.sqrt() + self.tau)


METHODS: dict[str, type[FedAvg]] = {cls.name: cls for cls in (FedAvg, FedProx, FedSQ, Scaffold, FedAvgM, FedAdam)}


def build(options: dict, store: ClientStore | None = None, num_clients: int = 1) -> FedAvg:
    """The strategy named by ``options["name"]`` (the run config's ``method`` block)."""
    name = options["name"]
    if name not in METHODS:
        raise ValueError(f"method.name: {name!r} is not one of {list(METHODS)}")
    return METHODS[name](options, store, num_clients)
