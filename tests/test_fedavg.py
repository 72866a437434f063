from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmia.core.config import ConfigError, TrainConfig
from fedmia.federation import fedavg
from fedmia.federation.defenses import Defense, DPDefense, defense_from_config
from fedmia.federation.fedavg import (
    DeviceData,
    aggregate,
    aggregation_rule,
    aggregation_weights,
    all_finite,
    client_generator,
    local_train,
    official_order,
    outputs_finite,
    run_fedavg,
)
from fedmia.federation.state import FlatState, StateLayout


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def tiny_data(n: int = 40) -> DeviceData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return DeviceData.from_arrays(images, labels, [0.5] * 3, [0.25] * 3, 3, torch.device("cpu"))


def test_aggregate_is_the_data_weighted_average_of_uploaded_models():
    w = torch.tensor([1.0, 2.0, 3.0])
    models = torch.tensor([[0.0, 0.0, 0.0], [3.0, 6.0, 9.0]])
    n = torch.tensor([1, 2])
    new = aggregate(w, w - models, aggregation_weights(n, "data_size", seed=0, rnd=1))
    assert torch.allclose(new, torch.tensor([2.0, 4.0, 6.0]))  # (1·0 + 2·3)/3 = 2, ...
    # bit for bit the step fedmia took before the weights became an option
    g = torch.Generator().manual_seed(0)
    w, ups, n = (
        torch.randn(50, generator=g),
        torch.randn(4, 50, generator=g),
        torch.tensor([7, 30, 11, 2]),
    )
    before = w - (n.to(torch.float32) / n.sum()) @ ups
    assert torch.equal(aggregate(w, ups, aggregation_weights(n, "data_size", 0, 1)), before)


def official_fed_avg(local_ws: list[torch.Tensor], client_weights: list[float]) -> torch.Tensor:
    """A transcription of the official ``_fed_avg``: the i-th listed model times weight i."""
    w_avg = local_ws[0] * client_weights[0]
    for i in range(1, len(local_ws)):
        w_avg += local_ws[i] * client_weights[i]
    return w_avg


def test_official_permuted_weights_are_the_official_code_s():
    """main.py (--frac 1): idxs_users = np.random.choice(range(K), K, replace=False); each
    round's local_ws follow idxs_users, client_weights follow client ids (n_i / n)."""
    g = torch.Generator().manual_seed(1)
    n = torch.tensor([5, 40, 12, 3, 20])
    w = torch.randn(30, generator=g, dtype=torch.float64)
    models = torch.randn(5, 30, generator=g, dtype=torch.float64)
    client_weights = [int(x) / int(n.sum()) for x in n]
    orders = []
    for rnd in range(1, 6):
        idxs_users = official_order(seed=7, rnd=rnd, k=5)
        orders.append(tuple(idxs_users))
        local_ws = [models[i] for i in idxs_users]
        want = official_fed_avg(local_ws, client_weights)
        a = aggregation_weights(n, "official_permuted", seed=7, rnd=rnd)
        torch.testing.assert_close(aggregate(w, w - models, a.double()), want)
        # a permutation of the data shares, client idxs_users[i] getting n_i / n
        assert sorted(a.tolist()) == sorted((n.float() / n.sum()).tolist())
        assert [a[c].item() for c in idxs_users] == (n.float() / n.sum()).tolist()
    assert len(set(orders)) > 1  # a fresh order each round
    assert tuple(official_order(7, 3, 5)) == orders[2]  # reproducible from (seed, round)
    assert any(tuple(official_order(8, r, 5)) != orders[r - 1] for r in range(1, 6))  # seeded


def test_official_permuted_changes_nothing_when_clients_are_equally_large():
    data = tiny_data()
    client_idx = [torch.arange(0, 10), torch.arange(10, 20), torch.arange(20, 30)]
    finals = []
    for how in ("data_size", "official_permuted"):
        cfg = TrainConfig(rounds=3, batch_size=4, lr=0.1, aggregation=how)
        st = FlatState(tiny_model())
        recs = [
            r.weights
            for r in run_fedavg(st, data, client_idx, torch.arange(30, 40), cfg, Defense(), seed=5)
        ]
        assert recs == [[pytest.approx(1 / 3)] * 3] * 3
        finals.append(st.flat.clone())
    assert torch.equal(finals[0], finals[1])


def test_aggregation_must_be_named():
    with pytest.raises(
        ConfigError,
        match=r"at 'train.aggregation': 'official' is not one of "
        r"\['data_size', 'official_permuted'\]",
    ):
        TrainConfig.from_dict({"aggregation": "official"})
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        aggregation_weights(torch.tensor([1, 2]), "mean", 0, 1)


@pytest.mark.parametrize(
    "block, equal",
    [
        ({"kind": "none"}, False),
        ({"kind": "dp", "sigma": 0.5, "clip": 1.0}, True),
        ({"kind": "dp_param_noise", "sigma": 0.1}, False),
        ({"kind": "quantize", "bits": 4}, False),
        (
            {
                "kind": "compose",
                "steps": [
                    {"kind": "subsample", "fraction": 0.5},
                    {"kind": "dp", "sigma": 0.5, "clip": 1.0},
                ],
            },
            True,
        ),
        (
            {
                "kind": "compose",
                "steps": [{"kind": "augment"}, {"kind": "subsample", "fraction": 0.5}],
            },
            False,
        ),
    ],
)
def test_dp_and_a_compose_holding_it_aggregate_with_equal_weights(block, equal):
    defense = defense_from_config(block)
    assert defense.data_independent_weights is equal
    for how in ("data_size", "official_permuted"):
        rule = aggregation_rule(TrainConfig(aggregation=how), defense)
        assert rule == ("equal" if equal else how)


@pytest.mark.parametrize("aggregation", ["data_size", "official_permuted"])
def test_a_dp_cell_s_weights_do_not_depend_on_client_sizes(aggregation):
    """w_{r+1} = w_r − mean_k Δ̃_k under dp; `none` keeps n_k / n (sizes 6, 24, 10)."""
    data = tiny_data()
    client_idx = [torch.arange(0, 6), torch.arange(6, 30), torch.arange(30, 40)]
    cfg = TrainConfig(rounds=2, batch_size=4, lr=0.1, aggregation=aggregation)
    n = torch.tensor([6, 24, 10])
    for defense, rule in ((DPDefense(sigma=0.01, clip=0.5), "equal"), (Defense(), aggregation)):
        st = FlatState(tiny_model())
        steps = []
        for rec in run_fedavg(st, data, client_idx, torch.arange(30, 40), cfg, defense, seed=2):
            steps.append((rec.global_flat.clone(), rec.uploads.clone(), rec.weights))
        ends = [g for g, _, _ in steps[1:]] + [st.flat]
        for rnd, ((sent, ups, weights), end) in enumerate(zip(steps, ends, strict=True), 1):
            if rule == "equal":
                assert weights == [pytest.approx(1 / 3)] * 3
                torch.testing.assert_close(end, sent - ups.mean(0))
            else:
                want = aggregation_weights(n, rule, seed=2, rnd=rnd)
                assert weights == want.tolist()
                if rule == "data_size":
                    assert weights == (n.float() / n.sum()).tolist()
                torch.testing.assert_close(end, sent - want @ ups)
                assert not torch.allclose(end, sent - ups.mean(0))


def test_flat_state_binds_parameters_and_bn_buffers():
    m = tiny_model()
    st = FlatState(m)
    names = [e.name for e in st.layout.entries]
    assert "1.running_mean" in names and "1.num_batches_tracked" not in names
    assert st.layout.size == sum(p.numel() for p in m.parameters()) + 8
    assert int(st.layout.param_mask().sum()) == sum(p.numel() for p in m.parameters())
    v = torch.arange(st.layout.size, dtype=torch.float32)
    st.load(v)
    assert torch.equal(m[5].bias, v[st.layout.entries[-1].slice])
    assert torch.equal(
        m[1].running_mean, v[[e for e in st.layout.entries if e.name == "1.running_mean"][0].slice]
    )
    m(torch.randn(4, 3, 6, 6))  # train-mode BN updates its statistics inside the flat vector
    assert not torch.equal(st.flat, v)
    assert StateLayout.from_list(st.layout.to_list()) == st.layout


def hand_round(
    model0: nn.Module, data: DeviceData, idx, cfg: TrainConfig, seed: int, rnd: int, client: int
):
    """One client round the obvious way: its own model copy, its own optimizer."""
    m = copy.deepcopy(model0).train()
    opt = torch.optim.SGD(
        m.parameters(), lr=cfg.lr_at(rnd), momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    g = client_generator(seed, rnd, client)
    for _ in range(cfg.local_epochs):
        order = idx[torch.randperm(len(idx), generator=g)]
        for s in range(0, len(order), cfg.batch_size):
            x, y = data.batch(order[s : s + cfg.batch_size])
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    return m.state_dict()


def test_one_round_matches_hand_computed_weighted_average():
    data = tiny_data()
    client_idx = [torch.arange(0, 10), torch.arange(10, 35)]  # sizes 10 and 25
    cfg = TrainConfig(rounds=1, local_epochs=2, batch_size=4, lr=0.1)
    model0 = tiny_model()
    expected_states = []
    for c, idx in enumerate(client_idx):
        expected_states.append(hand_round(model0, data, idx, cfg, seed=3, rnd=1, client=c))
    st = FlatState(copy.deepcopy(model0))
    recs = list(run_fedavg(st, data, client_idx, torch.arange(35, 40), cfg, Defense(), seed=3))
    assert len(recs) == 1 and recs[0].num_samples == [10, 25]
    final = st.module.state_dict()
    for e in st.layout.entries:
        want = (10 * expected_states[0][e.name] + 25 * expected_states[1][e.name]) / 35
        torch.testing.assert_close(final[e.name], want, rtol=1e-5, atol=1e-6)
    # the record holds what the server saw: the model sent and the uploaded updates
    w0 = FlatState(copy.deepcopy(model0)).flat
    assert torch.equal(recs[0].global_flat, w0)
    for c in range(2):
        up = torch.cat(
            [
                (model0.state_dict()[e.name] - expected_states[c][e.name]).reshape(-1)
                for e in st.layout.entries
            ]
        )
        torch.testing.assert_close(recs[0].uploads[c], up, rtol=1e-5, atol=1e-6)


def test_client_streams_are_independent_and_reproducible():
    a = torch.randperm(50, generator=client_generator(0, 1, 0))
    b = torch.randperm(50, generator=client_generator(0, 1, 0))
    c = torch.randperm(50, generator=client_generator(0, 1, 1))
    d = torch.randperm(50, generator=client_generator(0, 2, 0))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize(
    "schedule, r, want",
    [
        ("constant", 7, 0.1),
        ("exponential", 3, 0.1 * 0.99**2),
        ("cosine", 1, 0.1),
        ("cosine", 7, 0.05),  # half way: (1 + cos(π·5/10))/2 = 0.5
    ],
)
def test_lr_schedules(schedule, r, want):
    cfg = TrainConfig(rounds=10, lr=0.1, lr_schedule=schedule)
    assert cfg.lr_at(r) == pytest.approx(want)


def test_cosine_schedule_matches_the_official_script():
    # main.py: round r (epoch r-1) trains with self.lr, then sets
    # self.lr = lr_0 * (1 + cos(pi * epoch / epochs)) / 2 for the next round.
    t, lr0 = 300, 0.1
    official, lr = [], lr0
    for epoch in range(3):
        official.append(lr)
        lr = lr0 * (1 + math.cos(math.pi * epoch / t)) / 2
    cfg = TrainConfig(rounds=t, lr=lr0, lr_schedule="cosine")
    got = [cfg.lr_at(r) for r in (1, 2, 3)]
    assert got == pytest.approx(official, rel=1e-15)
    assert got[0] == got[1] == lr0
    assert got[2] == pytest.approx(lr0 * (1 + math.cos(math.pi / t)) / 2)


def test_observed_rounds():
    assert TrainConfig(rounds=30).observed() == [1, 10, 20, 30]
    assert TrainConfig(rounds=25, observe_every=10, observe_rounds=(3,)).observed() == [3, 10, 20]


class PixelSpy(Defense):
    """Records the pixels and labels its batch hook sees; changes nothing."""

    def __init__(self, whole_local_set: bool):
        self.whole_local_set = whole_local_set
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def batch(self, x, y, spec, gen):
        assert spec.num_classes == 3
        self.seen.append((spec.to_pixels(x), y))
        return x, y


@pytest.mark.parametrize("whole", [False, True])
def test_batch_hook_sees_pixels_through_the_data_spec(whole):
    data = tiny_data()
    idx = torch.arange(0, 10)
    cfg = TrainConfig(rounds=1, local_epochs=2, batch_size=4, lr=0.1)
    spy = PixelSpy(whole)
    st = FlatState(tiny_model())
    local_train(st, st.snapshot(), data, idx, cfg, 0.1, spy, client_generator(0, 1, 0))
    # mini-batches of 4, 4, 2 per epoch, or the whole local set once per epoch
    assert [len(y) for _, y in spy.seen] == ([10, 10] if whole else [4, 4, 2, 4, 4, 2])
    order = idx[torch.randperm(10, generator=client_generator(0, 1, 0))]  # epoch 1's order
    first = spy.seen[:1] if whole else spy.seen[:3]
    pix = torch.cat([p for p, _ in first])
    torch.testing.assert_close(pix, data.images[order].float() / 255, rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([y for _, y in first]), data.labels[order])


def test_whole_local_set_mode_trains_exactly_like_mini_batch_hooks():
    data = tiny_data()
    cfg = TrainConfig(rounds=1, local_epochs=3, batch_size=4, lr=0.1)
    ups = []
    for whole in (False, True):
        st = FlatState(tiny_model())
        res = local_train(
            st,
            st.snapshot(),
            data,
            torch.arange(5, 20),
            cfg,
            0.1,
            PixelSpy(whole),
            client_generator(2, 1, 0),
        )
        ups.append(res.upload)
    assert torch.equal(ups[0], ups[1])


def test_all_finite_sees_nan_and_both_infinities():
    t = torch.zeros(5)
    assert all_finite(t)
    for bad in (math.nan, math.inf, -math.inf):
        u = t.clone()
        u[3] = bad
        assert not all_finite(u)


def test_the_probe_catches_an_overflowing_upload_whose_aggregate_is_finite():
    """Two uploads ±H·v cancel in the aggregate; each uploaded model overflows."""
    state = FlatState(tiny_model())
    data = tiny_data()
    sent = state.snapshot()
    v = torch.zeros_like(sent)
    v[state.layout.param_mask()] = 1e30  # finite in float32, its logits are not
    uploads = torch.stack([v, -v])
    aggregate_flat = sent - uploads.mean(0)
    probe = torch.arange(8)
    assert all_finite(uploads) and all_finite(aggregate_flat)
    assert outputs_finite(state, data, probe, aggregate_flat)  # the aggregate alone is fine
    assert not outputs_finite(state, data, probe, aggregate_flat, sent, uploads)
    assert not outputs_finite(state, data, probe, sent - v)  # an overflowing aggregate


def test_uploads_are_probed_in_observed_rounds_only(monkeypatch):
    """The uploads' forward passes cost K passes a round: run where the measures read
    (observed rounds); the aggregate is probed every round."""
    calls = []

    def spy(state, data, idx, model_flat, sent=None, uploads=None):
        calls.append(uploads is not None)
        return True

    monkeypatch.setattr(fedavg, "outputs_finite", spy)
    cfg = TrainConfig(rounds=4, batch_size=5, observe_every=2, observe_rounds=(1,))
    list(
        run_fedavg(
            FlatState(tiny_model()),
            tiny_data(),
            [torch.arange(10), torch.arange(10, 20)],
            torch.arange(30, 40),
            cfg,
            Defense(),
            seed=0,
        )
    )
    assert calls == [True, True, False, True]  # rounds 1, 2, 4 observed


def test_an_aggregate_overflowing_in_an_unobserved_round_stops_training():
    class Blowup(Defense):
        def upload(self, update, layout, gen):
            return update * 1e36  # finite uploads, a model whose logits overflow

    cfg = TrainConfig(rounds=3, batch_size=5, observe_every=10, observe_rounds=())
    recs = list(
        run_fedavg(
            FlatState(tiny_model()),
            tiny_data(),
            [torch.arange(10), torch.arange(10, 20)],
            torch.arange(30, 40),
            cfg,
            Blowup(),
            seed=0,
        )
    )
    assert [r.diverged for r in recs] == [True] and recs[0].round == 1
