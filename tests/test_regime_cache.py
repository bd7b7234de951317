"""The regime cache: S's regimes computed once per sample are the live ones, and a model
trained or evaluated with them computes what it computes live."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsq import config, engine, models, strategies
from fedsq.dualcopy import DualCopy, RegimeCache


def _dual(name, gate_maxpool=False):
    torch.manual_seed(0)
    path = models.efficientnet_lite0_pip_file() if name == "efficientnet_lite0" else None
    return DualCopy(models.build(name, 4, path), gate_maxpool=gate_maxpool)


def _cache(dual, x, batch_size):
    return RegimeCache(dual, (x[i:i + batch_size] for i in range(0, len(x), batch_size)), len(x))


def _flip_share(live, cached):
    """Share of gate units whose cached regime differs from the live one, over all call sites."""
    flips = units = 0
    for a, b in zip(live, cached, strict=True):
        assert a.kind == b.kind
        if a.kind == "max-pool":
            assert a.indices.shape == b.indices.shape
            flips, units = flips + int((a.indices != b.indices).sum()), units + a.indices.numel()
            continue
        assert a.shape == b.shape
        b = b.cached.unpack(b.packed, a.linear.dtype)
        flips += int((a.codes() != b.codes()).sum())
        units += a.linear.numel()
    return flips / units


@pytest.mark.parametrize("name,gate_maxpool", [("resnet18", True), ("efficientnet_lite0", False)])
def test_cached_regimes_are_the_live_ones_whatever_the_batch(name, gate_maxpool):
    dual = _dual(name, gate_maxpool)
    x = torch.randn(12, 3, 32, 32)
    cache = _cache(dual, x, batch_size=5)  # built in other batches than those it serves
    for index in (torch.tensor([7, 0, 11, 3]), slice(4, 10)):
        # S's kernels give a sample the same result in any batch on CPU (the GPU smoke test reports its share)
        assert _flip_share(dual.structural_regimes(x[index]), cache[index]) == 0
    relu6 = [g for g in cache.gates if getattr(g, "high", None) == 6.0]
    assert bool(relu6) == (name == "efficientnet_lite0")  # the three-regime packing is exercised
    pools = [g for g in cache.gates if not hasattr(g, "high")]
    assert len(pools) == (1 if gate_maxpool else 0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_masks_unpack_in_the_layout_q_computes_in(memory_format):
    dual = _dual("efficientnet_lite0")
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=memory_format)
    cache = _cache(dual, x, batch_size=3)
    assert _flip_share(dual.structural_regimes(x), cache[:]) == 0
    for regime in cache[:]:
        assert regime.cached.unpack(regime.packed, torch.float32).linear.is_contiguous(memory_format=memory_format)


def test_cached_max_pool_indices_for_any_window_geometry():
    torch.manual_seed(1)
    pool = nn.MaxPool2d(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), ceil_mode=True)
    dual = DualCopy(nn.Sequential(nn.Conv2d(2, 3, 3), pool, nn.Flatten()), gate_maxpool=True)
    x = torch.randn(6, 2, 11, 9)
    cache = _cache(dual, x, batch_size=4)
    index = torch.tensor([5, 1, 2])
    assert _flip_share(dual.structural_regimes(x[index]), cache[index]) == 0
    assert cache.gates[0].offsets.dtype == torch.uint8


def test_packed_sizes():
    dual = _dual("efficientnet_lite0")
    cache = _cache(dual, torch.randn(3, 3, 32, 32), batch_size=3)
    units = [r.linear[0].numel() for r in dual.structural_regimes(torch.randn(1, 3, 32, 32))]
    bits = [2 if gate.high is not None else 1 for gate in cache.gates]
    assert cache.nbytes == 3 * sum(-(-u * b // 8) for u, b in zip(units, bits))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_training_with_the_cache_is_training_live(name):
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    live, cached = _dual(name), _dual(name)
    cache = _cache(cached, x, batch_size=16)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (live, cached)]
    for batch in (torch.tensor([3, 9, 1, 14, 0, 7, 12, 5]), torch.tensor([2, 8, 15, 4, 10, 6, 13, 11])):
        losses = []
        for model, optimizer, regimes in zip((live, cached), optimizers, (None, cache[batch])):
            model.train()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch], regimes), y[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss)
        # The same masks with the same strides: Q runs the same kernels, to the bit.
        assert torch.equal(losses[0], losses[1])
        for (key, a), b in zip(live.named_parameters(), cached.parameters()):
            assert torch.equal(a.grad, b.grad), key


def test_regimes_of_another_model_are_refused():
    dual = _dual("resnet18")
    cache = _cache(_dual("resnet18", gate_maxpool=True), torch.randn(2, 3, 32, 32), batch_size=2)
    with pytest.raises(RuntimeError, match="max-pool"):
        dual(torch.randn(2, 3, 32, 32), cache[:])


def _fedsq_cfg(digits_root, *overrides):
    raw = {
        "dataset": "digits", "backbone": "resnet18", "weights": "scratch", "image_size": 32,
        "split": {"scheme": "iid", "num_clients": 10}, "method": {"name": "fedsq"}, "optimizer": {"lr": 0.05},
        "device": "cpu", "paths": {"data": str(digits_root)},
    }
    return config.load(raw, overrides=list(overrides))


def test_regime_cache_policy(digits_root):
    dual = DualCopy(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    splits = {"train": torch.zeros(10, 3, 8, 8, dtype=torch.uint8), "val": torch.zeros(3, 3, 8, 8, dtype=torch.uint8)}

    def caches(**options):
        return strategies.FedSQ(**options).regime_caches(dual, splits, lambda x: x.float(), batch_size=4)

    assert {name: c.nbytes for name, c in caches().items()} == {"train": 10 * 18, "val": 3 * 18}  # 4x6x6 bits
    with pytest.warns(UserWarning, match="regime_cache_budget"):
        assert caches(regime_cache="auto", regime_cache_budget=1e-12) == {}
    assert set(caches(regime_cache=True, regime_cache_budget=1e-12)) == {"train", "val"}
    assert caches(regime_cache=False) == {}
    with pytest.raises(ValueError, match="method.regime_cache"):
        _fedsq_cfg(digits_root, "method.regime_cache=sometimes")
    assert _fedsq_cfg(digits_root, "method.regime_cache=off")["method"]["regime_cache"] is False


def test_a_client_trains_and_evaluates_alike_with_and_without_the_cache(digits_root, tmp_path):
    # validation on a subset: the cache holds that subset's regimes only, in its order
    sims = [engine.Simulation(_fedsq_cfg(digits_root, f"method.regime_cache={mode}", "eval.val_size=50"),
                              tmp_path / mode) for mode in ("on", "off")]
    assert set(sims[0].regime_caches) == {"train", "val", "test"} and sims[1].regime_caches == {}
    caches, train_samples = sims[0].regime_caches, len(sims[0].splits["train"][1])
    assert caches["val"].nbytes * train_samples == caches["train"].nbytes * 50
    results = []
    for sim in sims:  # in the engine's order: round 0 is evaluated (under inference mode) before training
        before = sim.predict("val")
        loss, _ = sim.train_client(0, sim.parts[0], 1, 0.05, sim.global_state())
        results.append((before, loss, sim.global_state(), sim.predict("val")))
    (before_on, loss_on, state_on, after_on), (before_off, loss_off, state_off, after_off) = results
    assert loss_on == loss_off
    for key in state_on:
        assert torch.equal(state_on[key], state_off[key]), key
    for on, off in zip((*before_on, *after_on), (*before_off, *after_off)):
        assert torch.equal(on, off)
