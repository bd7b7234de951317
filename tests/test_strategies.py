import copy

import pytest
import torch
from torch import nn

from fedsq import strategies
from fedsq.aggregate import WeightedAverage
from fedsq.batchnorm import BatchNormPolicy
from fedsq.client_store import ClientStore


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def options(name, **kw):
    base = {"name": name, "mu": 0.0, "gate_maxpool": False, "server_lr": None, "server_momentum": 0.9,
            "betas": [0.9, 0.99], "tau": 1e-3}
    return base | kw


def test_weighted_average_weights_by_samples_and_pools_variances():
    a, b = torch.randn(30, 5) * 2 + 1, torch.randn(10, 5) - 3
    states = [
        {"w": torch.full((2,), 1.0), "bn.running_mean": x.mean(0), "bn.running_var": x.var(0, unbiased=False),
         "bn.num_batches_tracked": torch.tensor(n)}
        for x, n in ((a, 3), (b, 7))
    ]
    avg = WeightedAverage({"bn.running_var": "bn.running_mean"})
    avg.add(states[0] | {"w": torch.full((2,), 1.0)}, 30)
    avg.add(states[1] | {"w": torch.full((2,), 5.0)}, 10)
    out = avg.result()
    pooled = torch.cat([a, b])
    assert torch.allclose(out["w"], torch.full((2,), 2.0))
    assert torch.allclose(out["bn.running_mean"], pooled.mean(0), atol=1e-5)
    # law of total variance: the pooled data's variance, not the mean of the two variances
    assert torch.allclose(out["bn.running_var"], pooled.var(0, unbiased=False), atol=1e-4)
    assert out["bn.num_batches_tracked"].item() == 7


def test_weighted_average_without_clients_is_an_error():
    with pytest.raises(ValueError, match="no client state"):
        WeightedAverage().result()


def test_client_store_reads_the_latest_version_before_a_round(tmp_path):
    store = ClientStore(tmp_path)
    assert store.get(3, before_round=1) is None
    for r in (1, 4, 6):
        store.put(3, r, {"c": torch.tensor([float(r)])})
    assert store.get(3, before_round=6)["c"].item() == 4.0  # redoing round 6 after a crash reads round 4's
    assert store.get(3, before_round=7)["c"].item() == 6.0


def _train_one_epoch(model, policy, batches):
    policy.train_mode(model)
    policy.epoch_begin(last=True)
    with torch.no_grad():
        for x in batches:
            policy.step_begin()
            model(x)


def test_pooled_policy_makes_running_stats_the_exact_epoch_average_and_restores_momentum():
    model = tiny()
    policy = BatchNormPolicy("pooled", model)
    batches = [torch.randn(16, 4) * 3 + 2 for _ in range(5)]
    torchs_own = copy.deepcopy(model).train()  # BatchNorm's cumulative average (momentum=None)
    torchs_own[1].reset_running_stats()
    torchs_own[1].momentum = None
    _train_one_epoch(model, policy, batches)
    bn = model[1]
    with torch.no_grad():
        for x in batches:
            torchs_own(x)
    # the host-side step count is the same arithmetic, bit for bit
    assert torch.equal(bn.running_mean, torchs_own[1].running_mean)
    assert torch.equal(bn.running_var, torchs_own[1].running_var)
    with torch.no_grad():
        pre = [model[0](x) for x in batches]
    assert torch.allclose(bn.running_mean, torch.stack([p.mean(0) for p in pre]).mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, torch.stack([p.var(0) for p in pre]).mean(0), atol=1e-4)
    policy.client_end(model, client=0, round=1)
    assert bn.momentum == 0.1
    assert set(policy.pooled_var()) == {"1.running_var"}


def test_averaged_policy_leaves_momentum_buffers_lagging():
    model = tiny()
    policy = BatchNormPolicy("averaged", model)
    _train_one_epoch(model, policy, [torch.randn(16, 4) + 5 for _ in range(5)])
    # 5 batches at momentum 0.1 move the mean only 1 - 0.9**5 ≈ 41% of the way
    assert model[1].running_mean.abs().mean() < 0.6 * model[0](torch.randn(256, 4) + 5).mean(0).abs().mean()
    assert policy.pooled_var() == {}


def test_frozen_policy_keeps_statistics(tmp_path):
    model = tiny()
    policy = BatchNormPolicy("frozen", model)
    before = model[1].running_mean.clone()
    _train_one_epoch(model, policy, [torch.randn(16, 4) + 5])
    assert torch.equal(model[1].running_mean, before) and model[0].training and not model[1].training


def test_local_policy_keeps_each_clients_batchnorm_on_disk(tmp_path):
    model = tiny()
    policy = BatchNormPolicy("local", model, ClientStore(tmp_path))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    policy.client_begin(model, client=2, round=1)
    with torch.no_grad():
        model[1].weight.fill_(7.0)
        model[0].weight.fill_(1.0)
    policy.client_end(model, client=2, round=1)
    model.load_state_dict(global_state)
    policy.client_begin(model, client=2, round=2)
    assert torch.all(model[1].weight == 7.0)  # its own BatchNorm came back
    assert torch.equal(model[0].weight, global_state["0.weight"])  # the rest is global
    with pytest.raises(ValueError, match="needs a ClientStore"):
        BatchNormPolicy("local", model)


def _client_step(strategy, model, global_state, x, y, lr=0.1, client=0, round=1):
    model.load_state_dict(global_state)
    strategy.client_begin(model, client, round, global_state)
    params = [p for _, p in strategies.trainable(model)]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    strategy.client_grad(params)
    opt.step()
    opt.zero_grad()
    strategy.client_end(model, client, round, 1, lr, 0.0, global_state)


def test_proximal_gradient_equals_the_per_parameter_loop_and_autograd_of_the_proximal_term():
    model = tiny()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    strategy = strategies.build(options("fedprox", mu=0.3))
    strategy.client_begin(model, 0, 1, global_state)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    strategy.client_grad(params)  # foreach ops
    loop = [g + 0.3 * (p.detach() - global_state[n]) for (n, p), g in zip(model.named_parameters(), grads)]
    torch.testing.assert_close([p.grad for p in params], loop)
    manual = [p.grad - g for p, g in zip(params, grads)]
    model.zero_grad()
    prox = sum(((p - global_state[n]) ** 2).sum() for n, p in model.named_parameters()) * 0.3 / 2
    prox.backward()
    torch.testing.assert_close(manual, [p.grad for p in params])


def test_scaffold_control_variates_follow_option_two_and_live_on_disk(tmp_path):
    model = tiny()
    strategy = strategies.build(options("scaffold"), ClientStore(tmp_path), num_clients=4)
    strategy.bind(model)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    _client_step(strategy, model, global_state, x, y, lr=0.1, client=1)
    c_1 = ClientStore(tmp_path).get(1, before_round=2)
    # first round, c = c_i = 0: c_i+ = (x - y_i) / (K lr) = the gradient of the one step taken
    name = "3.weight"
    assert torch.allclose(c_1[name], (global_state[name] - model.state_dict()[name]) / 0.1, atol=1e-6)
    strategy.server_update(global_state, model.state_dict())
    assert torch.allclose(strategy.c[name], c_1[name] / 4, atol=1e-6)
    # next round the correction c - c_i is applied to the gradient
    restored = strategies.build(options("scaffold"), ClientStore(tmp_path), num_clients=4)
    restored.bind(model)
    restored.load_state_dict(strategy.state_dict())
    restored.client_begin(model, 1, 2, global_state)
    params = [p for _, p in strategies.trainable(model)]
    for p in params:
        p.grad = torch.zeros_like(p)
    restored.client_grad(params)
    index = [n for n, _ in strategies.trainable(model)].index(name)
    assert torch.allclose(params[index].grad, strategy.c[name] - c_1[name], atol=1e-6)


def test_scaffold_variates_travelling_between_server_and_clients_equal_them_in_one_process(tmp_path):
    # The engine: one Scaffold object is server and clients. Flower (fedsq.flower): c travels to
    # each client (broadcast), the change of its c_i back to the server (client_report).
    model = tiny()
    one = strategies.build(options("scaffold"), ClientStore(tmp_path / "one"), num_clients=3)
    server = strategies.build(options("scaffold"), ClientStore(tmp_path / "server"), num_clients=3)
    node = strategies.build(options("scaffold"), ClientStore(tmp_path / "node"), num_clients=3)
    for strategy in (one, server, node):
        strategy.bind(model)
    torch.manual_seed(0)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    states = {"one": {k: v.clone() for k, v in model.state_dict().items()}}
    states["apart"] = copy.deepcopy(states["one"])
    for round in (1, 2):
        averages = {}
        for form, strategy in (("one", one), ("apart", node)):
            average = WeightedAverage()
            for client, (x, y) in enumerate(data):
                if form == "apart":
                    node.receive_broadcast(server.broadcast())
                _client_step(strategy, model, states[form], x, y, client=client, round=round)
                if form == "apart":
                    server.server_collect(node.client_report())
                average.add(model.state_dict(), 8)
            averages[form] = average.result()
        states = {"one": one.server_update(states["one"], averages["one"]),
                  "apart": server.server_update(states["apart"], averages["apart"])}
        assert all(torch.equal(one.c[n], server.c[n]) for n in one.c)
        assert any(server.c[n].abs().sum() > 0 for n in server.c)
        assert all(not d.any() for d in node._delta.values())  # handed over, none kept back
    assert all(torch.equal(states["one"][k], states["apart"][k]) for k in states["one"])


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_scaffold_recovers_a_constant_gradient_through_momentum_sgd(tmp_path, steps):
    lr, momentum = 0.05, 0.9
    model = nn.Linear(4, 3).double()
    x, weights = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    strategy = strategies.build(options("scaffold"), ClientStore(tmp_path), num_clients=1)
    strategy.bind(model)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    strategy.client_begin(model, 0, 1, global_state)
    params = [p for _, p in strategies.trainable(model)]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) * weights).sum().backward()  # linear in the parameters: a constant gradient
        strategy.client_grad(params)
        opt.step()
    gradient = {"weight": weights.T @ x, "bias": weights.sum(0)}
    strategy.client_end(model, 0, 1, steps, lr, momentum, global_state)
    c_i = ClientStore(tmp_path).get(0, before_round=2)
    for name, g in gradient.items():
        assert torch.allclose(c_i[name], g, rtol=1e-9, atol=1e-12)
        # the steady-state divisor K·lr/(1 - β) that this replaces does not recover it
        steady = (global_state[name] - model.state_dict()[name]) / (steps * lr / (1 - momentum))
        assert not torch.allclose(steady, g, rtol=1e-2)


def test_scaffold_needs_a_store():
    with pytest.raises(ValueError, match="scaffold needs a ClientStore"):
        strategies.build(options("scaffold"))


def test_fedavgm_without_momentum_at_lr_one_is_fedavg_and_momentum_accumulates():
    model = tiny()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    average = {k: v + 1.0 if v.is_floating_point() else v for k, v in global_state.items()}
    plain = strategies.build(options("fedavgm", server_lr=1.0, server_momentum=0.0))
    plain.bind(model)
    out = plain.server_update(global_state, average)
    assert all(torch.allclose(out[k].float(), average[k].float()) for k in average)
    heavy = strategies.build(options("fedavgm", server_lr=1.0, server_momentum=0.5))
    heavy.bind(model)
    first = heavy.server_update(global_state, average)
    second = heavy.server_update(first, {k: v + 1.0 if v.is_floating_point() else v for k, v in first.items()})
    # pseudo-gradient -1 twice: step 1 then 1 + 0.5
    assert torch.allclose(second["0.weight"], global_state["0.weight"] + 2.5)
    assert torch.equal(second["1.running_mean"], first["1.running_mean"] + 1.0)  # buffers: plain average


def test_fedadam_follows_algorithm_two_of_reddi_et_al_and_resumes():
    lr, (beta1, beta2), tau = 0.1, (0.9, 0.99), 1e-3
    model = tiny()
    strategy = strategies.build(options("fedadam", server_lr=lr, betas=[beta1, beta2], tau=tau))
    strategy.bind(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, m, v = state["0.weight"].clone(), torch.zeros_like(state["0.weight"]), torch.full_like(state["0.weight"], tau**2)
    torch.manual_seed(1)
    for _ in range(3):
        average = {k: t + torch.randn_like(t) if t.is_floating_point() else t for k, t in state.items()}
        delta = average["0.weight"] - x
        m = beta1 * m + (1 - beta1) * delta
        v = beta2 * v + (1 - beta2) * delta**2
        x = x + lr * m / (v.sqrt() + tau)
        state = strategy.server_update(state, average)
        assert torch.allclose(state["0.weight"], x, atol=1e-6)
        assert torch.equal(state["1.running_mean"], average["1.running_mean"])  # buffers: plain average
    clone = strategies.build(options("fedadam", server_lr=lr, betas=[beta1, beta2], tau=tau))
    clone.bind(model)
    clone.load_state_dict(copy.deepcopy(strategy.state_dict()))  # as through a checkpoint file
    average = {k: t + 0.5 if t.is_floating_point() else t for k, t in state.items()}
    a, b = strategy.server_update(state, average), clone.server_update(state, average)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(strategies.METHODS))
def test_a_strategy_built_directly_or_from_a_config_has_the_same_options(name, tmp_path):
    from fedsq import config

    store = ClientStore(tmp_path)
    context = {"store": store, "num_clients": 3} if name == "scaffold" else {}
    from_config = strategies.build(config.load({"method": {"name": name}})["method"], store, num_clients=3)
    assert vars(from_config) == vars(strategies.METHODS[name](**context))


def test_fedavgm_server_lr_defaults_to_one_minus_its_momentum():
    assert strategies.FedAvgM().server_lr == 0.5
    assert strategies.build({"name": "fedavgm", "server_momentum": 0.9}).server_lr == pytest.approx(0.1)
    assert strategies.build({"name": "fedavgm", "server_lr": 2.0}).server_lr == 2.0


def test_fedprox_without_a_proximal_term_warns():
    with pytest.warns(UserWarning, match="fedprox with mu = 0 is fedavg"):
        strategies.build({"name": "fedprox", "mu": 0.0})


def test_build_rejects_unknown_methods():
    with pytest.raises(ValueError, match="'fedsgd' is not one of"):
        strategies.build(options("fedsgd"))


def test_fedsq_trains_and_aggregates_only_the_quantitative_copy():
    from fedsq.dualcopy import DualCopy

    strategy = strategies.build(options("fedsq"))
    model = strategy.wrap(tiny())
    assert isinstance(model, DualCopy)
    reference = tiny()  # same seed: the pretrained weights S holds
    q_keys = set(model.state_dict())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    _client_step(strategy, model, global_state, x, y, lr=0.5)
    assert set(model.state_dict()) == q_keys
    assert any(not torch.equal(model.state_dict()[k], global_state[k]) for k in q_keys)
    # the structural copy is untouched: at the global weights the model is the pretrained function again
    model.load_state_dict(global_state)
    model.eval(), reference.eval()
    assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_client_store_keeps_what_a_resume_from_the_checkpoint_reads(tmp_path):
    # Training may run rounds ahead of the checkpoint on disk: client 0 trained in rounds 1, 2
    # and 3 while the checkpoint is still round 1's, so a resume redoes round 2 from version 1.
    store = ClientStore(tmp_path)
    for r in (1, 2, 3):
        store.put(0, r, {"w": torch.full((2,), float(r))})
    store.prune(1)
    assert store.get(0, before_round=2)["w"][0] == 1.0
    store.prune(2)  # checkpoint 2 landed: version 1 is unreadable now, 2 and 3 stay
    assert sorted(p.name for p in (tmp_path / "client0").iterdir()) == ["round2.pt", "round3.pt"]
    assert store.get(0, before_round=3)["w"][0] == 2.0
