"""Federated methods: what a client adds to its local training, and how the server combines.

In the style of Flower's strategies, one small class per method under the abstract
``Strategy``, which documents the hooks the engine calls around each sampled client's local
training. Each class takes its options as typed keyword arguments whose defaults are the only
defaults of those options: ``build`` maps the run config's ``method`` block onto them, and
``config.load`` fills the block's unset options from them (``defaults``), so a strategy built
directly and one built from a config agree.

Only ``model.state_dict()`` and the trainable ``model.named_parameters()`` are touched, so a
DualCopy's frozen structural copy is neither trained nor aggregated.
"""

from __future__ import annotations

import inspect
import os
import warnings
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch
from torch import nn

from fedsq.client_store import ClientStore


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class Strategy(ABC):
    """The hooks of one federated method, in the order the engine calls them."""

    name: ClassVar[str]

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """The model form clients train (FedSQ: a DualCopy of ``model``); once per run."""

    @abstractmethod
    def bind(self, model: nn.Module) -> None:
        """Allocate server state shaped like the wrapped model's trainable parameters; once per run."""

    @abstractmethod
    def client_begin(self, model: nn.Module, client: int, round: int, global_state: dict) -> None:
        """Before ``client`` trains in ``round``; ``model`` holds ``global_state``."""

    @abstractmethod
    def client_grad(self, params: list[nn.Parameter]) -> None:
        """After each backward pass, before the optimizer step: adjust ``p.grad`` in place."""

    @abstractmethod
    def client_end(self, model: nn.Module, client: int, round: int, steps: int, lr: float, momentum: float,
                   global_state: dict) -> None:
        """After local training, which took ``steps`` steps of a fresh
        ``torch.optim.SGD(lr=lr, momentum=momentum)``; ``model`` holds the client's result."""

    @abstractmethod
    def server_update(self, global_state: dict, average: dict) -> dict:
        """The next global state, from the sample-weighted average of the clients' states
        (``aggregate.WeightedAverage``)."""

    # Where clients train elsewhere (``fedsq.flower``), the server state they use travels to them
    # and what they add to it travels back; in the engine's single process both stay in place.

    def broadcast(self) -> dict[str, torch.Tensor]:
        """Server state a client needs for ``client_begin`` (SCAFFOLD: the control variate c)."""
        return {}

    def receive_broadcast(self, tensors: dict[str, torch.Tensor]) -> None:
        """On a client: take ``broadcast()``'s tensors as the server state."""

    def client_report(self) -> dict[str, torch.Tensor]:
        """On a client, after ``client_end``: what it adds to the server state, handed over (and
        forgotten here), for the server's ``server_collect``."""
        return {}

    def server_collect(self, report: dict[str, torch.Tensor]) -> None:
        """On the server, before ``server_update``: take in one client's ``client_report()``."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Server state a resumed run needs (tensors and plain values: it goes into the checkpoint)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s result; called after ``bind``."""


class FedAvg(Strategy):
    """McMahan et al. 2017: the new global model is the sample-weighted client average.

    ``mu > 0`` adds FedProx's proximal term (mu/2)·||w - w_global||², applied as its gradient
    mu·(w - w_global) so no extra autograd graph is built; every method composes with it.
    """

    name = "fedavg"

    def __init__(self, *, mu: float = 0.0):
        self.mu = float(mu)
        self._anchor: list[torch.Tensor] = []

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def bind(self, model: nn.Module) -> None:
        pass

    def client_begin(self, model: nn.Module, client: int, round: int, global_state: dict) -> None:
        if self.mu:
            self._anchor = [global_state[name] for name, _ in trainable(model)]

    def client_grad(self, params: list[nn.Parameter]) -> None:
        if self.mu:
            # One multi-tensor kernel per op on a GPU, not two kernel launches per parameter.
            with torch.no_grad():
                torch._foreach_add_([p.grad for p in params], torch._foreach_sub(params, self._anchor), alpha=self.mu)

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
    """Li et al. 2020: FedAvg plus the proximal term."""

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01):
        super().__init__(mu=mu)
        if not self.mu:
            # Flower warns the same way: a FedProx run at mu = 0 would be reported as FedProx.
            warnings.warn("method.mu: fedprox with mu = 0 is fedavg", stacklevel=2)


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

    def __init__(self, *, mu: float = 0.0, gate_maxpool: bool = False, regime_cache: bool | str = "auto",
                 regime_cache_budget: float = 0.25):
        super().__init__(mu=mu)
        if regime_cache not in ("auto", True, False):
            raise ValueError(f"method.regime_cache: {regime_cache!r} is not one of auto, true, false")
        self.gate_maxpool, self.regime_cache = bool(gate_maxpool), regime_cache
        self.regime_cache_budget = float(regime_cache_budget)

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

    def __init__(self, *, store: ClientStore | None, num_clients: int, mu: float = 0.0):
        super().__init__(mu=mu)
        if store is None:
            raise ValueError("method.name: scaffold needs a ClientStore for the client control variates")
        self.store, self.num_clients = store, num_clients
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

    def broadcast(self) -> dict[str, torch.Tensor]:
        return self.c

    def receive_broadcast(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.c[name].copy_(value)

    def client_report(self) -> dict[str, torch.Tensor]:
        report = {name: delta.clone() for name, delta in self._delta.items()}
        for delta in self._delta.values():
            delta.zero_()
        return report

    def server_collect(self, report: dict[str, torch.Tensor]) -> None:
        for name, delta in report.items():
            self._delta[name] += delta

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

    @abstractmethod
    def initial_buffers(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The buffers of parameter ``p`` before the first round."""

    @abstractmethod
    def step(self, delta: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """The move of one parameter; updates its ``buffers`` in place."""

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
    """Hsu et al. 2019: server SGD with momentum.

    ``server_lr`` None is 1 - ``server_momentum`` (Hsu et al.'s normalisation: a steady-state
    step of 1, as FedAvg's). ``server_momentum`` 0.5: at 0.9 and server lr 1 the step overshot
    where the clients measured their BatchNorm statistics, and a resnet18 from scratch
    evaluated at chance.
    """

    name = "fedavgm"

    def __init__(self, *, server_momentum: float = 0.5, server_lr: float | None = None, mu: float = 0.0):
        super().__init__(mu=mu)
        self.momentum = float(server_momentum)
        self.server_lr = 1.0 - self.momentum if server_lr is None else float(server_lr)

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

    def __init__(self, *, server_lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3,
                 mu: float = 0.0):
        super().__init__(mu=mu)
        self.server_lr, self.betas, self.tau = float(server_lr), tuple(betas), float(tau)

    def initial_buffers(self, p):
        # Algorithm 2 starts from m_{-1} = 0 and requires v_{-1} ≥ τ²: τ², its least value, is
        # the start closest to v = 0 that it allows (and it decays by β2 each round).
        return {"m": torch.zeros_like(p), "v": torch.full_like(p, self.tau**2)}

    def step(self, delta, buffers):
        beta1, beta2 = self.betas
        m = buffers["m"].mul_(beta1).add_(delta, alpha=1 - beta1)
        v = buffers["v"].mul_(beta2).addcmul_(delta, delta, value=1 - beta2)
        return self.server_lr * m / (v.sqrt() + self.tau)


METHODS: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedProx, FedSQ, Scaffold, FedAvgM, FedAdam)}

# What the engine hands a strategy besides the config's options, for those that take it.
_RUN_CONTEXT = ("store", "num_clients")


def method(name: str) -> type[Strategy]:
    if name not in METHODS:
        raise ValueError(f"method.name: {name!r} is not one of {list(METHODS)}")
    return METHODS[name]


def defaults(name: str) -> dict:
    """The options method ``name`` takes (run config keys of ``method``) with their defaults, as
    config values (lists, not tuples); None where the default depends on another option."""
    return {key: list(p.default) if isinstance(p.default, tuple) else p.default
            for key, p in inspect.signature(method(name)).parameters.items() if key not in _RUN_CONTEXT}


def build(options: dict, store: ClientStore | None = None, num_clients: int = 1) -> Strategy:
    """The strategy named by ``options["name"]`` (the run config's ``method`` block), with the
    options it takes; unset (null) ones keep their defaults, options of other methods are ignored."""
    cls = method(options["name"])
    takes = inspect.signature(cls).parameters
    given = {key: value for key, value in options.items() if key in takes and value is not None}
    context = {key: value for key, value in (("store", store), ("num_clients", num_clients)) if key in takes}
    return cls(**given, **context)
