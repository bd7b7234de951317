"""Every fedsq method as a Flower app (Message API): the engine's pieces, trained on SuperNodes.

The server side is ``engine.run`` itself (evaluation, checkpoints, ``metrics.csv``,
``summary.json``, MLflow) over a ``FederatedSimulation``: the engine's ``Simulation`` whose
rounds send the global state to the sampled SuperNodes and aggregate their replies with the
run's strategy and BatchNorm policy. Each SuperNode runs the engine's ``train_client`` on its
own data, so local training (strategy hooks, DualCopy for FedSQ, BatchNorm policy, divergence
check, seeding by (seed, round, client)) is the engine's code, not a copy.

Messages (``RecordDict`` keys); every message to a node carries ``settings`` (``run``: the
resolved run config as JSON, from which the node builds the same model and strategy):
  query     node -> server: ``metrics`` (``client``: its client id, ``num-examples``,
            ``class-counts``).
  train     server -> node: ``global`` (the global ``state_dict``: a DualCopy's holds Q only,
            so FedSQ's structural copy S never leaves the node that built it), ``broadcast``
            (strategy state the client needs: SCAFFOLD's c), ``settings`` round and lr;
            node -> server: ``state`` (its trained ``state_dict``, BatchNorm statistics
            included, which the server pools as the engine does), ``report`` (SCAFFOLD: the
            change of its control variate), ``metrics`` (loss sum, samples).
  evaluate  server -> node: ``global``; node -> server: ``metrics`` (correct predictions on
            its own training samples: the summary's ``client_acc``).

Node config: ``partition-id`` (the client id, 0 .. split.num_clients - 1; Flower's simulation
sets it), optional ``dataset`` (the node's own ``imagefolder:<folder>`` or ``npz:<file>``,
prepared into ``data-root``; without it, partition ``partition-id`` of the run config's
prepared dataset), optional ``data-root``, ``weights-root`` and ``state-dir`` (where client
state lives: SCAFFOLD's c_i, FedBN's layers).

Flower run config: ``config`` (path of the fedsq run config), ``out`` (the run folder),
``connect-timeout`` (seconds for split.num_clients SuperNodes to connect, and again for them to
answer the first message, which builds their data and model), ``round-timeout`` (seconds a
round, or the final client evaluation, waits for replies), ``min-train-nodes`` (replies a round
needs; 0 = every sampled client).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsq import config, data, engine, partition
from fedsq.checkpoint import snapshot

# Flower run config keys of the ServerApp and their defaults.
RUN_CONFIG = {"config": "", "out": "", "connect-timeout": 120.0, "round-timeout": 3600.0, "min-train-nodes": 0}


class FederationError(RuntimeError):
    """The federation failed a step: too few SuperNodes, replies or answers in time."""


def _arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.contiguous() for k, v in snapshot(tensors, copy=False).items()})


def _tensors(record: ArrayRecord, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in record.to_torch_state_dict().items()}


# ---------------------------------------------------------------- the SuperNode side

def _build_simulation(cfg: dict, node_config: dict, run_id: int) -> engine.Simulation:
    """The node's Simulation: of partition ``partition-id`` of the run's dataset, or of the node's
    own ``dataset``, all of whose training samples are its one client's."""
    state_dir = Path(node_config.get("state-dir") or Path(tempfile.gettempdir()) / "fedsq-flower") / f"run{run_id}"
    paths = dict(cfg["paths"])
    if node_config.get("weights-root"):
        paths["weights"] = str(node_config["weights-root"])
    own = node_config.get("dataset")
    if not own:
        return engine.Simulation(cfg | {"paths": paths}, state_dir)
    paths |= {"data": str(node_config.get("data-root") or state_dir / "data"), "partition": None}
    data.prepare(str(own), Path(paths["data"]), image_size=cfg["image_size"])
    cfg = cfg | {"dataset": str(own), "paths": paths, "split": cfg["split"] | {"scheme": "iid", "num_clients": 1},
                 "clients_per_round": None}
    return engine.Simulation(cfg, state_dir / f"client{node_config['partition-id']}")


_simulations: dict[tuple, engine.Simulation] = {}


def _client(msg: Message, context: Context) -> tuple[engine.Simulation, int, np.ndarray]:
    """(the node's Simulation, its client id, its training samples). The Simulation is built once
    per run and process: in Flower's simulation one process serves many partitions of one
    dataset, and they share it as the engine's clients do."""
    own, client = context.node_config.get("dataset"), int(context.node_config["partition-id"])
    key = (context.run_id, own, client if own else None)
    if key not in _simulations:
        _simulations.clear()  # one run's model and data at a time
        cfg = json.loads(str(msg.content["settings"]["run"]))
        _simulations[key] = _build_simulation(cfg, context.node_config, context.run_id)
    sim = _simulations[key]
    return sim, client, sim.parts[0 if own else client]


def client_app() -> ClientApp:
    """The ClientApp: describes, trains and evaluates the node's client with the engine's code."""
    app = ClientApp()

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        sim, client, indices = _client(msg, context)
        counts = partition.class_counts([indices], sim.splits["train"][1].cpu().numpy(), sim.num_classes).iloc[0]
        metrics = MetricRecord({"client": client, "num-examples": len(indices),
                                "class-counts": [int(c) for c in counts]})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        (sim, client, indices), settings = _client(msg, context), msg.content["settings"]
        global_state = _tensors(msg.content["global"], sim.device)
        if "broadcast" in msg.content:
            sim.strategy.receive_broadcast(_tensors(msg.content["broadcast"], sim.device))
        round = int(settings["round"])
        loss_sum, samples = sim.train_client(client, indices, round, float(settings["lr"]), global_state)
        for store in sim.client_stores:  # no resume reads older versions here
            store.prune(round)
        reply = RecordDict({"state": _arrays(sim.model.state_dict()),
                            "metrics": MetricRecord({"client": client, "loss-sum": loss_sum, "samples": samples,
                                                     "num-examples": len(indices)})})
        report = sim.strategy.client_report()
        if report:
            reply["report"] = _arrays(report)
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        sim, client, indices = _client(msg, context)
        sim.model.load_state_dict(_tensors(msg.content["global"], sim.device))
        correct, _ = sim.predict("train", torch.from_numpy(indices).to(sim.device))
        metrics = MetricRecord({"client": client, "correct": int(correct.sum()), "num-examples": len(correct)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


# ---------------------------------------------------------------- the server side

class FederatedSimulation(engine.Simulation):
    """The engine's Simulation on the server (global model, strategy, BatchNorm policy,
    evaluation on the run config's validation and test splits) whose clients are SuperNodes."""

    def __init__(self, cfg: dict, work_dir: Path, *, grid: Grid, options: dict):
        super().__init__(cfg, work_dir)
        self.grid, self.options = grid, options
        self.run_json = json.dumps(cfg)
        self.nodes, self.client_sizes, self.class_counts = self._enrol()

    def _settings(self, **values) -> ConfigRecord:
        return ConfigRecord({"run": self.run_json} | values)

    def _exchange(self, message_type: str, node_ids: list[int], content: RecordDict, need: int, what: str,
                  timeout_key: str = "round-timeout") -> dict[int, RecordDict]:
        """Send ``content`` to the nodes and wait (option ``timeout_key``) for their replies: the
        good ones by node id, or an error naming every node that failed or did not answer when
        fewer than ``need`` answered."""
        timeout = float(self.options[timeout_key])
        messages = [Message(content, dst_node_id=node, message_type=message_type) for node in node_ids]
        replies, failures = {}, {}
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                failures[node] = f"node {node}: {reply.error.reason}"
            else:
                replies[node] = reply.content
        failures |= {node: f"node {node}: no reply within {timeout:g} s ({timeout_key})"
                     for node in node_ids if node not in replies and node not in failures}
        if len(replies) < need:
            raise FederationError(f"{what}: {len(replies)} of {len(node_ids)} nodes replied, {need} needed; "
                                  + "; ".join(failures.values()))
        if failures:
            warnings.warn(f"{what}: going on without " + "; ".join(failures.values()), stacklevel=2)
        return replies

    def _enrol(self) -> tuple[dict[int, int], list[int], pd.DataFrame]:
        """(client id -> node id, client sizes, class counts) of the split.num_clients SuperNodes."""
        wanted = self.cfg["split"]["num_clients"]
        deadline = time.monotonic() + float(self.options["connect-timeout"])
        while len(node_ids := sorted(self.grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                raise FederationError(f"{len(node_ids)} SuperNodes connected within {self.options['connect-timeout']} s "
                                      f"(connect-timeout), split.num_clients is {wanted}")
            time.sleep(1)
        # The first message builds each node's data and model: it may take longer than a round.
        replies = self._exchange(MessageType.QUERY, node_ids, RecordDict({"settings": self._settings()}),
                                 need=len(node_ids), what="enrolment", timeout_key="connect-timeout")
        described = {int(reply["metrics"]["client"]): (node, reply["metrics"]) for node, reply in replies.items()}
        if sorted(described) != list(range(wanted)) or len(described) != len(node_ids):
            ids = sorted(int(reply["metrics"]["client"]) for reply in replies.values())
            raise FederationError(f"the SuperNodes' partition-ids are {ids}; expected each of 0..{wanted - 1} once "
                                  "(split.num_clients)")
        nodes = {client: node for client, (node, _) in described.items()}
        sizes = [int(described[client][1]["num-examples"]) for client in range(wanted)]
        counts = pd.DataFrame([list(described[client][1]["class-counts"]) for client in range(wanted)],
                              index=pd.RangeIndex(wanted, name="client"),
                              columns=[str(c) for c in range(self.num_classes)])
        return nodes, sizes, counts

    def train_round(self, round: int, lr: float, global_state: dict,
                    after_client: Callable[[], None] = lambda: None) -> tuple[dict, float, int]:
        """One round on the sampled clients' SuperNodes; aggregated in client order, as the engine does."""
        clients = [int(c) for c in engine.sample_clients(self.cfg, round)]
        content = RecordDict({"global": _arrays(global_state), "settings": self._settings(round=round, lr=lr)})
        broadcast = self.strategy.broadcast()
        if broadcast:
            content["broadcast"] = _arrays(broadcast)
        need = int(self.options["min-train-nodes"]) or len(clients)
        replies = self._exchange(MessageType.TRAIN, [self.nodes[c] for c in clients], content,
                                 need=min(need, len(clients)), what=f"round {round}")
        average, loss_sum, samples = self.new_average(), 0.0, 0
        for client in clients:
            reply = replies.get(self.nodes[client])
            if reply is None:
                continue
            average.add(_tensors(reply["state"], self.device), self.client_sizes[client])
            if "report" in reply:
                self.strategy.server_collect(_tensors(reply["report"], self.device))
            loss_sum, samples = loss_sum + float(reply["metrics"]["loss-sum"]), samples + int(reply["metrics"]["samples"])
            after_client()
        return self.strategy.server_update(global_state, average.result()), loss_sum / samples, samples

    def client_accuracy(self) -> np.ndarray:
        """Each client's accuracy on its own training samples, measured on its SuperNode."""
        content = RecordDict({"global": _arrays(self.global_state()), "settings": self._settings()})
        replies = self._exchange(MessageType.EVALUATE, list(self.nodes.values()), content, need=1,
                                 what="client accuracy")
        return np.array([float(reply["metrics"]["correct"]) / float(reply["metrics"]["num-examples"])
                         for reply in replies.values()])

    def write_partition(self, folder: Path) -> None:
        """The class counts the SuperNodes reported; their sample indices stay with them."""
        partition.write_counts(self.class_counts, folder)


def run(grid: Grid, run_config: dict) -> dict:
    """The fedsq run named by Flower's run config (``RUN_CONFIG``) on ``grid``; returns its summary."""
    options = RUN_CONFIG | dict(run_config)
    if not options["config"] or not options["out"]:
        raise ValueError("Flower run config: 'config' (a fedsq run config file) and 'out' (the run folder) are needed")
    cfg = config.load(options["config"])

    def simulation(cfg: dict, out_dir: Path) -> FederatedSimulation:
        return FederatedSimulation(cfg, out_dir, grid=grid, options=options)

    return engine.run(cfg, Path(options["out"]), simulation=simulation)


def server_app(**run_config) -> ServerApp:
    """The ServerApp; ``run_config`` are defaults under Flower's run config (``run_simulation``
    passes none of its own)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, run_config | dict(context.run_config))

    return app


def simulate(config_path: Path, out: Path, cpus_per_client: float | None = None, gpus_per_client: float = 0.0) -> None:
    """The run in Flower's simulation engine, one virtual SuperNode per client (split.num_clients);
    by default one ClientApp at a time on all CPUs, as the engine trains one client at a time."""
    from flwr.simulation import run_simulation

    cfg = config.load(config_path)
    resources = {"num_cpus": cpus_per_client or os.cpu_count(), "num_gpus": gpus_per_client}
    run_simulation(server_app(config=str(config_path), out=str(out)), client, cfg["split"]["num_clients"],
                   backend_config={"client_resources": resources})


# The components `flwr run` loads (flower/pyproject.toml).
server = server_app()
client = client_app()
