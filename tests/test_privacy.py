"""sigmax_fl.privacy: accounting against references, clipping bounds, noise, DP-SGD.

Real torch and the real RDP backend (Flower's RdpAccountant on dp-accounting), no mocks.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from sigmax_fl import privacy
from sigmax_fl.model import build_model
from sigmax_fl.privacy import (
    CentralAccountant,
    LocalAccountant,
    add_gaussian_noise,
    central_noise_std,
    central_sensitivity,
    clip_per_sample,
    clip_update,
    compute_epsilon,
    group_privacy,
    l2_norm,
    load_local_accountant,
    per_sample_gradients,
    poisson_batches,
    private_aggregate,
    private_gradient,
    save_local_accountant,
    train_dp_sgd,
)

OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
"""Opacus's RDPAccountant.DEFAULT_ALPHAS, to reproduce its published figure."""


# ---------------------------------------------------------------------------------------------
# Accounting


def test_epsilon_matches_opacus_published_value() -> None:
    # Opacus's own accountant test: z = 1.5, q = 0.04, 2250 steps, delta = 1e-5 -> 7.32911117143.
    # dp-accounting bounds fractional orders slightly differently (2e-4 apart).
    eps = compute_epsilon(1.5, 0.04, int(90 / 0.04), 1e-5, orders=OPACUS_ORDERS)
    assert eps == pytest.approx(7.32911117143, abs=1e-3)


def test_epsilon_matches_dp_accounting_directly() -> None:
    # The float rate goes through Flower's integer sample/population event: no drift.
    import dp_accounting  # the flwr[dp] extra

    reference = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1))
    reference.compose(event, 10_000)
    acc = CentralAccountant()
    acc.step(1.1, 0.01, 10_000)
    assert acc.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_unsampled_gaussian_matches_closed_form() -> None:
    # q = 1: RDP(alpha) = T alpha / (2 z^2) exactly; (eps, delta) by the conversion
    # eps = min_alpha RDP + log((alpha-1)/alpha) - (log delta + log alpha) / (alpha - 1).
    z, rounds, delta = 2.0, 30, 1e-5
    alphas = np.asarray(OPACUS_ORDERS)
    rdp = rounds * alphas / (2 * z**2)
    expected = np.min(
        rdp + np.log((alphas - 1) / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1)
    )
    acc = CentralAccountant(orders=OPACUS_ORDERS)
    for _ in range(rounds):
        acc.step(z, 1.0)
    assert acc.steps == rounds
    assert acc.epsilon(delta) == pytest.approx(float(expected), rel=1e-9)


def test_epsilon_grows_with_rounds_and_falls_with_noise_and_sampling() -> None:
    acc = CentralAccountant()
    assert acc.epsilon(1e-5) == 0.0
    history = []
    for _ in range(5):
        acc.step(1.0, 0.5, 3)
        history.append(acc.epsilon(1e-5))
    assert all(b > a > 0 for a, b in itertools.pairwise(history))
    assert acc.ledger == [(1.0, 0.5, 15)]
    assert compute_epsilon(2.0, 0.5, 15, 1e-5) < history[-1]
    assert compute_epsilon(1.0, 0.1, 15, 1e-5) < history[-1]
    assert compute_epsilon(1.0, 0.5, 15, 1e-3) < history[-1]


def test_zero_noise_is_infinite_and_zero_rate_is_free() -> None:
    acc = CentralAccountant()
    acc.step(1.0, 0.0, 100)
    assert acc.epsilon(1e-5) == 0.0
    acc.step(0.0, 1.0)
    assert acc.epsilon(1e-5) == math.inf
    with pytest.raises(ValueError, match="sampling_rate"):
        acc.step(1.0, 1.5)


def test_would_exceed_stops_before_the_target() -> None:
    target, delta = 4.0, 1e-5
    acc = CentralAccountant()
    with pytest.raises(ValueError, match="no step accounted"):
        acc.would_exceed(target, delta)
    assert not acc.would_exceed(target, delta, noise_multiplier=3.0, sampling_rate=1.0)
    rounds = 0
    while not acc.would_exceed(target, delta, noise_multiplier=3.0, sampling_rate=1.0):
        acc.step(3.0, 1.0)
        rounds += 1
    assert rounds > 1
    assert acc.epsilon(delta) <= target
    before = acc.state_dict()
    assert acc.would_exceed(target, delta)  # defaults to the last step's parameters
    assert acc.state_dict() == before  # asking changes nothing
    acc.step(3.0, 1.0)
    assert acc.epsilon(delta) > target
    # Looking further ahead is the same question
    fresh = CentralAccountant()
    assert fresh.would_exceed(target, delta, rounds + 1, noise_multiplier=3.0, sampling_rate=1.0)
    assert not fresh.would_exceed(target, delta, rounds, noise_multiplier=3.0, sampling_rate=1.0)


def test_state_dict_round_trips_through_json_and_resumes() -> None:
    acc = CentralAccountant()
    acc.step(1.2, 0.3, 7)
    acc.step(0.8, 1.0, 2)
    state = json.loads(json.dumps(acc.state_dict()))
    restored = CentralAccountant()
    restored.load_state_dict(state)
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
    assert restored.steps == acc.steps == 9
    # Resuming then stepping equals never having stopped
    acc.step(1.0, 0.5, 4)
    restored.step(1.0, 0.5, 4)
    assert restored.epsilon(1e-6) == pytest.approx(acc.epsilon(1e-6), rel=1e-12)
    # A client-level ledger is not a row-level one
    with pytest.raises(ValueError, match="per 'instance'"):
        LocalAccountant().load_state_dict(state)
    # A malformed ledger is refused whole: nothing half-loaded under-reports epsilon
    broken = json.loads(json.dumps(state))
    broken["ledger"].append({"noise_multiplier": 1.0, "sampling_rate": 2.0, "steps": 1})
    kept = restored.state_dict()
    with pytest.raises(ValueError, match="malformed accountant state"):
        restored.load_state_dict(broken)
    assert restored.state_dict() == kept


def test_local_accountant_persists_atomically_on_disk(tmp_path) -> None:
    path = tmp_path / "privacy" / "coinbase-btc-usd-1d.json"
    acc = load_local_accountant(path)
    assert acc.steps == 0 and acc.epsilon(1e-5) == 0.0
    for _round in range(3):  # each round in a fresh process: load, step, save
        acc = load_local_accountant(path)
        acc.step(1.0, 32 / 1300, 205)
        save_local_accountant(path, acc)
    again = load_local_accountant(path)
    assert again.steps == 615
    assert again.epsilon(1e-5) == acc.epsilon(1e-5) > 0
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    if os.name == "posix":  # its sampling rate tells the instance's row count: owner-only
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable privacy ledger"):
        load_local_accountant(path)


def test_group_privacy_for_bars() -> None:
    eps, delta = group_privacy(0.1, 1e-5, privacy.BAR_ROWS_WINDOWED)
    assert eps == pytest.approx(6.2)
    assert delta == pytest.approx(1e-5 * (math.exp(6.2) - 1) / (math.exp(0.1) - 1))
    assert delta <= 62 * math.exp(61 * 0.1) * 1e-5
    assert group_privacy(0.15, 1e-5, 62)[1] < 1 < group_privacy(0.16, 1e-5, 62)[1]
    assert group_privacy(1.0, 1e-5, 62)[1] > 1  # vacuous for a per-row eps of 1
    assert group_privacy(0.5, 1e-5, 1) == (0.5, 1e-5)


# ---------------------------------------------------------------------------------------------
# Central DP


def _random_update(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    shapes = {"a": (rng.integers(1, 20), rng.integers(1, 20)), "b": (rng.integers(1, 30),)}
    return {n: rng.normal(0, scale, size=s).astype(np.float32) for n, s in shapes.items()}


def test_clipped_norms_never_exceed_the_bound() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        clip = float(10 ** rng.uniform(-4, 3))
        delta = _random_update(rng, float(10 ** rng.uniform(-8, 8)))
        clipped, factor = clip_update(delta, clip)
        norm = l2_norm(delta)
        assert l2_norm(clipped) <= clip
        assert 0 < factor <= 1
        if norm <= clip:  # small updates pass unchanged
            assert factor == 1.0
            for name in delta:
                np.testing.assert_array_equal(clipped[name], delta[name])
        else:  # large ones keep their direction and land on the bound
            assert l2_norm(clipped) == pytest.approx(clip, rel=1e-9)
            for name in delta:
                np.testing.assert_allclose(clipped[name], factor * delta[name].astype(np.float64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_update({"a": np.array([np.nan])}, 1.0)


def test_sensitivity_and_noise_std() -> None:
    shares = [0.5, 0.3, 0.2]
    assert central_sensitivity(2.0, shares) == pytest.approx(1.0)
    assert central_sensitivity(2.0, shares, relation="replace-one") == pytest.approx(2.0)
    assert central_sensitivity(2.0, shares, renormalised=True) == pytest.approx(2.0)
    assert central_noise_std(2.0, 1.5, shares) == pytest.approx(1.5 * 0.5 * 2.0)
    assert central_noise_std(2.0, 1.5, 0.25) == pytest.approx(0.75)  # the cap alone


def test_sensitivity_bounds_hold_for_removing_any_instance() -> None:
    from sigmax_fl.strategy import capped_shares

    rng = np.random.default_rng(1)
    clip = 1.0
    zero = {"a": np.zeros(40)}
    for _ in range(200):
        k = int(rng.integers(3, 9))
        examples = [int(n) for n in rng.integers(10, 5000, size=k)]
        cap = max(0.3, 1.0 / (k - 1) + 1e-9)
        updates = [{"a": rng.normal(0, 10, size=40)} for _ in range(k)]
        shares = capped_shares(examples, cap)
        full, _ = private_aggregate(zero, updates, shares, clip_norm=clip, noise_std=0, rng=rng)
        for j in range(k):
            rest = [u for i, u in enumerate(updates) if i != j]
            # Fixed shares: j's share is not handed on
            fixed = [s for i, s in enumerate(shares) if i != j]
            out, _ = private_aggregate(zero, rest, fixed, clip_norm=clip, noise_std=0, rng=rng)
            gap = l2_norm({"a": full["a"] - out["a"]})
            assert gap <= central_sensitivity(clip, shares) + 1e-12
            # Renormalised over the remaining replies: within twice that
            again = capped_shares([n for i, n in enumerate(examples) if i != j], cap)
            out, _ = private_aggregate(zero, rest, again, clip_norm=clip, noise_std=0, rng=rng)
            gap = l2_norm({"a": full["a"] - out["a"]})
            assert gap <= central_sensitivity(clip, shares, renormalised=True) + 1e-12


def test_central_noise_is_really_applied_at_the_stated_std() -> None:
    rng = np.random.default_rng(2)
    reference = {"w": rng.normal(size=(200, 100)), "b": rng.normal(size=100)}
    updates = [
        {n: a + rng.normal(0, 5, size=a.shape) for n, a in reference.items()} for _ in range(4)
    ]
    shares = [0.4, 0.3, 0.2, 0.1]
    clip, z = 0.5, 1.3
    std = central_noise_std(clip, z, shares)
    assert std == pytest.approx(z * 0.4 * clip)
    clean, factors = private_aggregate(
        reference, updates, shares, clip_norm=clip, noise_std=0.0, rng=rng
    )
    assert all(f < 1 for f in factors)
    noisy, _ = private_aggregate(
        reference, updates, shares, clip_norm=clip, noise_std=std, rng=np.random.default_rng(3)
    )
    noise = np.concatenate([(noisy[n] - clean[n]).ravel() for n in reference])
    assert noise.size == 20_100
    assert np.std(noise) == pytest.approx(std, rel=0.03)
    assert abs(np.mean(noise)) < 4 * std / math.sqrt(noise.size)
    other, _ = private_aggregate(
        reference, updates, shares, clip_norm=clip, noise_std=std, rng=np.random.default_rng(4)
    )
    assert not np.allclose(other["w"], noisy["w"])
    again = add_gaussian_noise(clean, std, np.random.default_rng(3))
    np.testing.assert_allclose(again["w"], noisy["w"])  # the same draw, nothing else added
    assert privacy.secure_rng().normal() != privacy.secure_rng().normal()


# ---------------------------------------------------------------------------------------------
# DP-SGD


def _data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 50)).astype(np.float32)
    y = (0.5 * X[:, 0] - 0.3 * X[:, 1] + 0.1 * rng.normal(size=rows)).astype(np.float32)
    return X, y


def _manual_row_gradients(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> list:
    rows = []
    for i in range(len(X)):
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(X[i : i + 1]), y[i : i + 1])
        loss.backward()
        rows.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return rows


def test_per_sample_gradients_equal_a_manual_loop() -> None:
    model = build_model("trading-mlp", seed=0)
    X, y = (torch.from_numpy(a) for a in _data(6))
    grads, losses = per_sample_gradients(model, X, y)
    manual = _manual_row_gradients(model, X, y)
    for i, row in enumerate(manual):
        for name, g in row.items():
            torch.testing.assert_close(grads[name][i], g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses, (model(X) - y).pow(2).detach())


def test_per_sample_clipping_bounds_each_rows_contribution() -> None:
    model = build_model("trading-mlp", seed=0)
    X, y = _data(8)
    y[3] = 1e4  # an outlier whose raw gradient is huge
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    clip = 0.1
    grads, _ = per_sample_gradients(model, Xt, yt)
    clipped, factors = clip_per_sample(grads, clip)
    norms = torch.sqrt(sum(g.reshape(8, -1).pow(2).sum(1) for g in clipped.values()))
    assert (norms <= clip).all()
    # Property over random gradients of every scale: never above the bound
    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        scale = 10 ** float(torch.empty(1).uniform_(-6, 6, generator=gen))
        fake = {
            "w": torch.randn(16, 7, 3, generator=gen) * scale,
            "b": torch.randn(16, 5, generator=gen) * scale,
        }
        bound = 10 ** float(torch.empty(1).uniform_(-3, 3, generator=gen))
        out, _ = clip_per_sample(fake, bound)
        sq = out["w"].reshape(16, -1).pow(2).sum(1) + out["b"].pow(2).sum(1)
        assert (sq.sqrt() <= bound).all()
    assert factors[3] < 1e-3
    # The DP-SGD gradient (no noise) is the sum of manually clipped row gradients / denominator
    manual = _manual_row_gradients(model, Xt, yt)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row in manual:
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in row.values()))
        scale = clip / norm if norm > clip else 1.0
        for n, g in row.items():
            expected[n] += scale * g
    gen = torch.Generator().manual_seed(0)
    out, _ = private_gradient(
        model, Xt, yt, clip_norm=clip, noise_multiplier=0.0, denominator=4.0, generator=gen
    )
    for n in expected:
        torch.testing.assert_close(out[n], expected[n] / 4.0, rtol=1e-4, atol=1e-7)
    # Removing the outlier moves the summed gradient by at most C
    rest = [i for i in range(8) if i != 3]
    without, _ = private_gradient(
        model,
        Xt[rest],
        yt[rest],
        clip_norm=clip,
        noise_multiplier=0.0,
        denominator=1.0,
        generator=gen,
    )
    with_all, _ = private_gradient(
        model, Xt, yt, clip_norm=clip, noise_multiplier=0.0, denominator=1.0, generator=gen
    )
    gap = math.sqrt(sum(float((with_all[n] - without[n]).double().pow(2).sum()) for n in without))
    assert gap <= clip * (1 + 1e-5)


def test_private_gradient_without_noise_or_clipping_is_the_ordinary_gradient() -> None:
    model = build_model("trading-mlp", seed=1)
    X, y = (torch.from_numpy(a) for a in _data(32, seed=1))
    out, _ = private_gradient(
        model,
        X,
        y,
        clip_norm=1e9,
        noise_multiplier=0.0,
        denominator=32.0,
        generator=torch.Generator().manual_seed(0),
    )
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(X), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(out[n], p.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_dp_sgd_with_no_noise_and_huge_clip_is_ordinary_training(optimizer: str) -> None:
    X, y = _data(200, seed=2)
    seed, batch, lr, epochs = 7, 16, 1e-2, 2
    dp_model = build_model("trading-mlp", seed=3)
    _, steps, q = train_dp_sgd(
        dp_model,
        X,
        y,
        epochs=epochs,
        batch_size=batch,
        learning_rate=lr,
        clip_norm=1e9,
        noise_multiplier=0.0,
        seed=seed,
        optimizer=optimizer,
    )
    assert (q, steps) == (batch / 200, epochs * math.ceil(200 / batch))
    # Ordinary training on the same Poisson batches, loss normalised by the expected batch size
    plain = build_model("trading-mlp", seed=3)
    opt = (
        torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(plain.parameters(), lr=lr)
    )
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for b in poisson_batches(200, q, steps, torch.Generator().manual_seed(seed)):
        opt.zero_grad(set_to_none=True)
        ((plain(Xt[b]) - yt[b]) ** 2).sum().div(q * 200).backward()
        opt.step()
    for (n, a), b in zip(dp_model.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_dp_sgd_noise_is_applied_and_seeded() -> None:
    X, y = _data(128, seed=4)
    kwargs = dict(epochs=1, batch_size=32, learning_rate=1e-3, clip_norm=1.0, optimizer="sgd")
    models = {}
    for key, z, seed in (("a", 1.0, 1), ("a2", 1.0, 1), ("b", 1.0, 2), ("clean", 0.0, 1)):
        models[key] = build_model("trading-mlp", seed=0)
        loss, steps, q = train_dp_sgd(models[key], X, y, noise_multiplier=z, seed=seed, **kwargs)
        assert steps == 4 and q == 0.25 and np.isfinite(loss)
    weights = {k: torch.cat([p.flatten() for p in m.parameters()]) for k, m in models.items()}
    assert torch.equal(weights["a"], weights["a2"])  # a seed reproduces (tests only)
    assert not torch.allclose(weights["a"], weights["b"])
    # The noise moved the weights by about what z C / (q N) per coordinate predicts
    moved = (weights["a"] - weights["clean"]).std().item()
    assert 1e-5 < moved < 1e-2
    unseeded = build_model("trading-mlp", seed=0)
    train_dp_sgd(unseeded, X, y, noise_multiplier=1.0, seed=None, **kwargs)
    assert not torch.equal(torch.cat([p.flatten() for p in unseeded.parameters()]), weights["a"])


def test_dp_sgd_refuses_batchnorm() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(50, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
    )
    X, y = _data(10)
    with pytest.raises(ValueError, match="BatchNorm"):
        train_dp_sgd(
            model,
            X,
            y,
            epochs=1,
            batch_size=4,
            learning_rate=1e-3,
            clip_norm=1.0,
            noise_multiplier=1.0,
            seed=0,
        )
