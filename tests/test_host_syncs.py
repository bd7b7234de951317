"""No training step waits on the device: on a GPU every tensor read back to the host (``.item()``,
``float(t)``, ``if t:``...) and every tensor made from host data (``torch.tensor``...) stops the
host until the GPU catches up. Counted on CPU by wrapping those calls, per local-training step."""

import collections

import pytest
import torch

from fedsq import config, engine

# Tensor -> host conversions, and host -> tensor constructions.
READS_BACK = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
MADE_FROM_HOST = ("tensor", "as_tensor", "from_numpy")


@pytest.fixture
def host_syncs(monkeypatch):
    """A Counter of the calls above, by name, made while it is in use."""
    calls = collections.Counter()

    def counted(name, original):
        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return call

    for name in READS_BACK:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in MADE_FROM_HOST:
        monkeypatch.setattr(torch, name, counted(name, getattr(torch, name)))
    return calls


@pytest.mark.parametrize("overrides", [
    ["bn=pooled"],  # the last local epoch's cumulative BatchNorm average
    ["method.name=fedprox"],
    ["method.name=fedsq", "method.regime_cache=true", "method.gate_maxpool=true"],
    ["method.name=fedsq", "method.regime_cache=false"],
    ["method.name=scaffold", "bn=local"],
], ids=lambda o: "-".join(v.split("=")[1] for v in o))
def test_no_host_sync_in_a_training_step_but_the_divergence_check(overrides, digits_root, tmp_path, monkeypatch,
                                                                   host_syncs):
    raw = {"dataset": "digits", "backbone": "resnet18", "weights": "scratch", "image_size": 32,
           "split": {"scheme": "iid", "num_clients": 10}, "local_epochs": 2, "optimizer": {"lr": 0.01},
           "device": "cpu", "paths": {"data": str(digits_root)}}
    sim = engine.Simulation(config.load(raw, overrides=overrides), tmp_path)
    indices, state = sim.parts[0][:24], sim.global_state()  # few samples: steps are what is counted
    monkeypatch.setattr(engine, "DIVERGENCE_CHECK_EVERY", 3)
    counts = {}
    for steps_per_epoch in (2, 8):
        sim.cfg["batch_size"] = -(-len(indices) // steps_per_epoch)
        host_syncs.clear()
        sim.train_client(0, indices, 1, 0.01, state)
        counts[steps_per_epoch] = +host_syncs
    # 12 more steps (6 more per epoch, 2 epochs): 4 more divergence checks (every 3rd step), and nothing else
    assert counts[8] - counts[2] == {"item": 4}
    assert not counts[2] - counts[8]
