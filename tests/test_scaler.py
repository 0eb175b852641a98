"""The federated scaler: pooled statistics that equal the concatenated training rows' own.

Tolerance: the pooled mean within 1e-6 of each feature's standard deviation and the pooled
scale within a relative 1e-6 of the one computed on the concatenated raw training rows. The
instances rebuild their raw features from the float32 scaled cache (relative error ~1e-7 of a
feature's spread) and the merge is float64.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Metadata, RecordDict
from flwr.app.message import make_message

from sigmax_fl import client_app, compare, runs, scaling, task
from sigmax_fl.data import load_ohlcv, parse_sources
from sigmax_fl.dataset import Recipe, load_instance
from sigmax_fl.deploy.flwr_cli import FINISHED_OK, FlwrHome
from sigmax_fl.features import Calendar, make_features
from sigmax_fl.model import build_model
from sigmax_fl.server_app import ServerState
from sigmax_fl.settings import ConfigError, Settings
from sigmax_fl.strategy import META_KEY

from .conftest import DEFAULT_INSTANCES, ROOT, RUN_TIMEOUT

SOURCES = ",".join(DEFAULT_INSTANCES[:2])
SETTINGS = Settings(data_sources=SOURCES, scaler="federated")
RUN_CONFIG = {"local-epochs": 1, "data-sources": SOURCES, "scaler": "federated"}


def _raw_training_rows(instance: str) -> np.ndarray:
    """An instance's unscaled training features, built from its bars independently."""
    (source,) = parse_sources(instance)
    bars = load_ohlcv(source.path)
    X, _ = make_features(bars, SETTINGS.horizon, max_gap=SETTINGS.max_gap)
    calendar = Calendar.from_strings(SETTINGS.train_end, SETTINGS.val_end, embargo=SETTINGS.horizon)
    return X.to_numpy(np.float32)[calendar.split(X.index)["train"]].astype(np.float64)


def _assert_pooled(scaler: dict | scaling.Scaler, rows: np.ndarray) -> None:
    mean = np.asarray(scaler["mean"] if isinstance(scaler, dict) else scaler.mean)
    scale = np.asarray(scaler["scale"] if isinstance(scaler, dict) else scaler.scale)
    std = rows.std(axis=0)
    expected_scale = np.where(std > 1e-12, std, 1.0)
    np.testing.assert_array_less(np.abs(mean - rows.mean(axis=0)), 1e-6 * expected_scale + 1e-12)
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)


@pytest.fixture(scope="module")
def pooled_rows() -> np.ndarray:
    return np.concatenate([_raw_training_rows(name) for name in DEFAULT_INSTANCES[:2]])


# -- the maths ---------------------------------------------------------------------------------


def test_merged_moments_equal_the_concatenation_where_raw_sums_of_squares_fail() -> None:
    # Price-like features: a large offset, unit spread, three unequal instances
    rng = np.random.default_rng(0)
    parts = [1e8 + rng.standard_normal((n, 3)) * (1 + k) for k, n in enumerate((5, 400, 37))]
    merged = scaling.pool([scaling.Moments.of(p) for p in parts])
    rows = np.concatenate(parts)
    assert merged.count == len(rows)
    np.testing.assert_allclose(merged.mean, rows.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(merged.std, rows.std(axis=0), rtol=1e-7)
    # What the centred sums avoid: sum x^2 / n - mean^2 loses the variance to cancellation
    naive = np.sqrt(np.abs((rows**2).sum(axis=0) / len(rows) - rows.mean(axis=0) ** 2))
    assert np.abs(naive / rows.std(axis=0) - 1).max() > 1e-3


def test_a_malformed_statistics_reply_is_refused() -> None:
    good = scaling.Moments.of(np.ones((3, 2))).to_record()
    assert scaling.Moments.from_record(good).count == 3
    for bad in (
        {**good, "count": 0},
        {**good, "sum": [1.0]},
        {**good, "m2": [float("nan"), 0.0]},
        {**good, "m2": [-1.0, 0.0]},
    ):
        with pytest.raises(ValueError):
            scaling.Moments.from_record(bad)


def test_rescaled_instances_are_standardised_together(pooled_rows: np.ndarray) -> None:
    recipe = Recipe.of(SETTINGS)
    data = [load_instance(s, recipe) for s in parse_sources(SOURCES)]
    # The cached (locally scaled, float32) arrays give back the raw features, each within
    # float32 rounding of a scaled value (|z| < ~20) times the feature's spread
    own = _raw_training_rows(DEFAULT_INSTANCES[0])
    error = np.abs(data[0].raw("train") - own).max(axis=0)
    np.testing.assert_array_less(error, 1e-5 * own.std(axis=0) + 1e-12)
    scaler = scaling.pool([scaling.Moments.of(d.raw("train")) for d in data]).scaler()
    _assert_pooled(scaler, pooled_rows)
    X = np.concatenate([d.rescaled(scaler).X("train") for d in data]).astype(np.float64)
    varying = pooled_rows.std(axis=0) > 1e-12
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(X.std(axis=0)[varying], 1.0, atol=1e-5)
    # Each instance alone is not: the federated scaler is not the local one
    assert np.abs(data[0].rescaled(scaler).X("train").mean(axis=0)).max() > 0.05


def test_compare_can_normalise_with_the_pooled_statistics(pooled_rows: np.ndarray) -> None:
    sources, recipe = parse_sources(SOURCES), Recipe.of(SETTINGS)
    local = compare.load_markets(sources, recipe)
    federated = compare.load_markets(sources, recipe, "federated")
    X = np.concatenate([m.data.X("train") for m in federated]).astype(np.float64)
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-5)
    # Local: each instance centred on its own mean, so the first is not centred by the pool
    own = local[0].data.X("train").astype(np.float64)
    np.testing.assert_allclose(own.mean(axis=0), 0.0, atol=1e-5)
    assert np.abs(federated[0].data.X("train").mean(axis=0)).max() > 0.05
    with pytest.raises(ValueError, match="scaler 'global'"):
        compare.load_markets(sources, recipe, "global")


# -- the ClientApp -----------------------------------------------------------------------------


def _context(partition: int, **run_config: object) -> Context:
    return Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config={**RUN_CONFIG, **run_config},
    )


def _message(kind: str, content: RecordDict) -> object:
    return make_message(Metadata(1, "m1", 0, 5, "", "1", time.time(), 600.0, kind), content)


def test_an_instance_shares_only_its_training_moments_and_only_when_opted_in() -> None:
    query = _message(scaling.QUERY, RecordDict({"config": ConfigRecord()}))
    reply = client_app.scaler_statistics(query, _context(0))
    assert set(reply.content.keys()) == {scaling.RECORD, META_KEY}
    assert set(reply.content[scaling.RECORD].keys()) == {"count", "sum", "m2"}
    moments = scaling.Moments.from_record(reply.content[scaling.RECORD])
    own = _raw_training_rows(DEFAULT_INSTANCES[0])
    assert moments.count == len(own)
    _assert_pooled(moments.scaler(), own)
    with pytest.raises(ConfigError, match="scaler' = 'local'"):
        client_app.scaler_statistics(query, _context(0, scaler="local"))


def test_the_client_trains_on_the_pooled_scaling_it_is_sent() -> None:
    recipe = Recipe.of(SETTINGS)
    data = [load_instance(s, recipe) for s in parse_sources(SOURCES)]
    scaler = scaling.pool([scaling.Moments.of(d.raw("train")) for d in data]).scaler()
    state = {"mean": scaler.mean.tolist(), "scale": scaler.scale.tolist()}
    initial = build_model("trading-mlp", seed=3).state_dict()

    def content(config: dict) -> RecordDict:
        return RecordDict(
            {"arrays": ArrayRecord(initial), "config": ConfigRecord({"server-round": 1, **config})}
        )

    reply = client_app.train(_message("train", content(scaling.to_config(state))), _context(0))
    sent = reply.content["arrays"].to_torch_state_dict()
    # The same training by hand, on the data normalised with the pooled statistics
    model = build_model("trading-mlp", seed=3)
    own = data[0].rescaled(scaler)
    seed = SETTINGS.seed * 1_000_003 + 7919 + zlib.crc32(DEFAULT_INSTANCES[0].encode())
    task.train(
        model,
        own.X("train"),
        own.y("train"),
        epochs=1,
        batch_size=32,
        learning_rate=1e-3,
        seed=seed,
    )
    for k, v in model.state_dict().items():
        torch.testing.assert_close(sent[k], v, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="carries no pooled scaler statistics"):
        client_app.train(_message("train", content({})), _context(0))


# -- the server's state and settings -----------------------------------------------------------


def test_checkpoints_carry_the_scaler_and_older_ones_have_none() -> None:
    scaler = {"mean": [0.5, 1.0], "scale": [2.0, 1.0], "rows": 9, "instances": ["a", "b"]}
    state = ServerState(round=1, arrays={"w": np.ones(2, np.float32)}, scaler=scaler)
    payload = state.to_checkpoint({})
    assert ServerState.from_checkpoint(payload).scaler == scaler
    del payload["scaler"]
    assert ServerState.from_checkpoint(payload).scaler == {}


def test_the_federated_scaler_with_secure_aggregation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'scaler' = 'federated'.*secure-aggregation = true"):
        Settings(scaler="federated", secure_aggregation=True, max_weight_share=1.0)


# -- through Flower ----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_simulation_normalises_every_instance_with_the_pooled_statistics(
    simulation: FlwrHome, tmp_path: Path, pooled_rows: np.ndarray
) -> None:
    outputs = tmp_path / "outputs"
    run_id = simulation.run_app(
        ROOT,
        "sim",
        run_config={
            **RUN_CONFIG,
            "num-server-rounds": 1,
            "min-available-nodes": 2,
            "outputs-dir": str(outputs),
            "run-name": "federated-scaler",
        },
        federation_config={"num-supernodes": 2},
        stream=False,
        timeout=RUN_TIMEOUT,
    )
    assert simulation.run_status(run_id, "sim") == FINISHED_OK
    run_dir = outputs / "federated-scaler"
    written = json.loads((run_dir / "scaler.json").read_text())
    assert written["instances"] == sorted(DEFAULT_INSTANCES[:2])
    assert written["rows"] == len(pooled_rows)
    _assert_pooled(written, pooled_rows)
    # The checkpoint carries exactly what was sent, so a resumed run sends the same
    checkpoint = runs.read_checkpoint(run_dir / runs.CHECKPOINTS / "round-00001.pt")
    assert json.loads(checkpoint["scaler"]) == written
    (record,) = json.loads((run_dir / runs.HISTORY_JSON).read_text())
    assert record["train"]["replies-ok"] == 2 and not record["skipped"]
