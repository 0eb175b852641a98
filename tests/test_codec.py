"""update-encoding: float16 / int8 deltas, error feedback, and what the server makes of them."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from sigmax_fl import kept
from sigmax_fl.attacks import LoopbackGrid, run_server_app, simulated_nodes
from sigmax_fl.codec import (
    BLOCK,
    ENCODING_KEY,
    SCALE_SUFFIX,
    FreshArrays,
    MalformedUpdateError,
    NpyLayout,
    NpyViews,
    as_numpy,
    bytes_address,
    decode_update,
    encode_update,
    npy_array,
)
from sigmax_fl.deploy.flwr_cli import FlwrHome
from sigmax_fl.model import build_model
from sigmax_fl.settings import ConfigError, Settings
from sigmax_fl.strategy import META_KEY, Defences, WeightedFedAvg, screen_train_reply

from .conftest import in_process_run, on_instances, simulate


@pytest.fixture(autouse=True)
def _identity() -> None:
    # Messages outside a running Flower process need a task identity to be built.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def model_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    return {
        k: v.numpy().copy() for k, v in build_model("trading-mlp", seed=seed).state_dict().items()
    }


def trained(
    received: dict[str, np.ndarray], seed: int, size: float = 0.01
) -> dict[str, np.ndarray]:
    """``received`` moved by a random update of about ``size`` per weight, as training would."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, size, v.shape)).astype(np.float32) for k, v in received.items()}


def reply(node: int, arrays: ArrayRecord, encoding: str, n: int = 100) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    meta = {"instance-id": f"inst-{node}"}
    if encoding != "float32":
        meta[ENCODING_KEY] = encoding
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"num-examples": n}),
            META_KEY: ConfigRecord(meta),
        }
    )
    return Message(content, reply_to=sent)


@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_round_trip_error_is_bounded_by_the_format(encoding: str) -> None:
    received = model_arrays()
    local = trained(received, seed=1)

    arrays, residual = encode_update(local, received, encoding)
    decoded = decode_update(arrays, received, encoding)

    for name, weights in local.items():
        delta = (weights - received[name]).ravel()
        error = (decoded[name] - weights).ravel()
        assert decoded[name].dtype == np.float32 and decoded[name].shape == weights.shape
        if encoding == "float16":
            # half precision: 11 significant bits, relative to each delta (plus float32 sums)
            assert np.all(np.abs(error) <= np.abs(delta) * 2**-11 + 2e-7)
        else:
            # int8: half a step of the block's own scale, max |delta in block| / 127
            padded = np.zeros(-(-delta.size // BLOCK) * BLOCK)
            padded[: delta.size] = np.abs(delta)
            step = np.repeat(padded.reshape(-1, BLOCK).max(axis=1) / 127, BLOCK)[: delta.size]
            assert np.all(np.abs(error) <= step / 2 + 2e-7)
        # what was lost is exactly what the instance keeps for next round
        np.testing.assert_allclose(residual[name], weights - decoded[name], atol=2e-7)


def test_bytes_per_update_on_the_real_model() -> None:
    received = model_arrays()
    local = trained(received, seed=2)
    down = Message(RecordDict(), dst_node_id=1, message_type="train")
    sizes = {}
    for encoding in ("float32", "float16", "int8"):
        arrays, _ = encode_update(local, received, encoding)
        message = Message(RecordDict({"arrays": arrays}), reply_to=down)
        sizes[encoding] = (arrays.count_bytes(), message_to_proto(message).ByteSize())
    for i in range(2):  # what the history records, and the serialised protobuf
        assert sizes["float16"][i] <= 0.55 * sizes["float32"][i]
        assert sizes["int8"][i] <= 0.30 * sizes["float32"][i]


@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_error_feedback_keeps_the_cumulative_error_bounded(encoding: str) -> None:
    # Prepare: 60 rounds of small updates with a common drift, which rounding alone would
    # keep losing in the same direction (int8: below half a step of the block's scale)
    received = model_arrays()
    rng = np.random.default_rng(3)
    drift = {k: rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in received.items()}
    big = {k: np.float32(0.05) for k in received}  # one large value per tensor sets the scale

    def cumulative_error(feedback: bool, rounds: int) -> float:
        residual = None
        true_sum = {k: np.zeros(v.shape) for k, v in received.items()}
        sent_sum = {k: np.zeros(v.shape) for k, v in received.items()}
        for r in range(rounds):
            local = {}
            for k, v in received.items():
                update = drift[k] + rng.normal(0, 1e-4, v.shape).astype(np.float32)
                update.reshape(-1)[0] = big[k] * (1 if r % 2 else -1)
                local[k] = v + update
                true_sum[k] += local[k] - v
            arrays, left = encode_update(local, received, encoding, residual)
            residual = left if feedback else None
            decoded = decode_update(arrays, received, encoding)
            for k, v in received.items():
                sent_sum[k] += decoded[k] - v
        return max(float(np.abs(true_sum[k] - sent_sum[k]).max()) for k in received)

    # Execute
    with_feedback = [cumulative_error(True, n) for n in (10, 60)]
    without = cumulative_error(False, 60)

    # Assert: with feedback the error after 60 rounds is no larger than after 10 (bounded by
    # one round's quantisation), without it the same updates drift away
    one_round_bound = 0.05 / 127 if encoding == "int8" else 0.05 * 2**-11
    assert with_feedback[1] <= one_round_bound + 1e-6
    assert with_feedback[1] <= 1.5 * with_feedback[0] + 1e-7
    assert without > 5 * with_feedback[1]


def _int8_record(values: dict[str, np.ndarray]) -> dict[str, Array]:
    arrays, _ = encode_update(trained(values, seed=4), values, "int8")
    return dict(arrays.items())


def _npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


def _tampered(kind: str, received: dict[str, np.ndarray]) -> tuple[ArrayRecord, str]:
    arrays = _int8_record(received)
    name = "net.0.weight"
    if kind == "missing scale":
        del arrays[name + SCALE_SUFFIX]
    elif kind == "wrong dtype":
        arrays[name] = Array(np.zeros(received[name].shape, np.int16))
    elif kind == "wrong shape":
        arrays[name] = Array(np.zeros((3, 3), np.int8))
    elif kind == "short scale":
        arrays[name + SCALE_SUFFIX] = Array(np.ones(2, np.float32))
    elif kind == "negative scale":
        scale = np.ones(-(-received[name].size // BLOCK), np.float32)
        scale[1] = -1
        arrays[name + SCALE_SUFFIX] = Array(scale)
    elif kind == "npy lies":
        shape = received[name].shape
        data = _npy_bytes(np.zeros(4, np.int8))
        arrays[name] = Array(dtype="int8", shape=shape, stype="numpy.ndarray", data=data)
    elif kind == "dtype numpy does not know":
        data = arrays[name].data
        arrays[name] = Array(
            dtype="zz", shape=received[name].shape, stype="numpy.ndarray", data=data
        )
    elif kind == "unknown encoding":
        return ArrayRecord(arrays), "int4"
    return ArrayRecord(arrays), "int8"


MALFORMED = {
    "missing scale": "missing ['net.0.weight:scale']",
    "wrong dtype": "is int16",
    "wrong shape": "is int8[3, 3]",
    "short scale": "'net.0.weight:scale' is float32[2]",
    "negative scale": "negative, NaN or Inf scale",
    "npy lies": "npy content disagrees",
    "unknown encoding": "unknown update encoding 'int4'",
    "dtype numpy does not know": "is zz",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_encoded_reply_is_rejected_with_its_reason(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: two good int8 replies and one malformed, against the sent global model
    received = model_arrays()
    good = [reply(i, ArrayRecord(_int8_record(received)), "int8") for i in (1, 2)]
    arrays, encoding = _tampered(kind, received)
    strategy = WeightedFedAvg(defences=Defences(max_weight_share=1.0))
    strategy._sent = ArrayRecord({k: Array(v) for k, v in received.items()})

    # Execute
    with pytest.raises(MalformedUpdateError, match=MALFORMED[kind].replace("[", r"\[")):
        decode_update(arrays, received, encoding)
    with caplog.at_level(logging.WARNING, logger="flwr.sigmax_fl.strategy"):
        result, metrics = strategy.aggregate_train(1, [*good, reply(3, arrays, encoding)])

    # Assert: the round goes on with the good ones; the log names the instance and the reason
    assert result is not None and metrics["replies-ok"] == 2 and metrics["replies-rejected"] == 1
    bad = next(s for s in strategy.last_train if s.instance_id == "inst-3")
    assert "does not decode" in bad.reason and MALFORMED[kind] in bad.reason
    logged = [r.getMessage() for r in caplog.records]
    assert any("inst-3" in line and MALFORMED[kind] in line for line in logged), logged


def test_server_decodes_before_screening() -> None:
    # Prepare: the same trained models sent as float32 weights and as int8 deltas, plus one
    # int8 reply whose decoded model is 100x too far: screening must see the decoded norm
    received = model_arrays()
    locals_ = [trained(received, seed=s) for s in (5, 6, 7)]
    far = {k: received[k] + 100 * (v - received[k]) for k, v in trained(received, 8).items()}
    sent = ArrayRecord({k: Array(v) for k, v in received.items()})

    def run(encoding: str) -> tuple[dict[str, np.ndarray], WeightedFedAvg]:
        replies = [
            reply(i, encode_update(m, received, encoding)[0], encoding)
            for i, m in enumerate([*locals_, far], start=1)
        ]
        strategy = WeightedFedAvg(defences=Defences(max_weight_share=1.0))
        strategy._sent = sent
        result, _ = strategy.aggregate_train(1, replies)
        return {k: a.numpy() for k, a in result.items()}, strategy

    # Execute
    plain, _ = run("float32")
    int8, strategy = run("int8")

    # Assert: the far one is rejected by its decoded norm; the average matches float32's
    assert [s.ok for s in strategy.last_train] == [True, True, True, False]
    assert "above bound" in strategy.last_train[3].reason
    for name, values in plain.items():
        step = np.abs(values - received[name]).max() / 127
        np.testing.assert_allclose(int8[name], values, atol=step)


def test_update_encoding_with_secure_aggregation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="update-encoding.*secure-aggregation"):
        Settings(update_encoding="int8", secure_aggregation=True)


@pytest.mark.integration
def test_int8_simulation_sends_a_quarter_and_learns_as_float32(
    simulation: FlwrHome, tmp_path: Path
) -> None:
    # Prepare: two rounds, three synthetic instances
    config = {
        "num-server-rounds": 2,
        "local-epochs": 1,
        "data-sources": "synthetic:3:seed=2:signal=0.3:start=2018-01-01:end=2019-12-31",
        "min-available-nodes": 3,
        "outputs-dir": str(tmp_path),
    }

    # Execute: int8 through Flower's simulation engine; float32, the reference, in process
    run_config = {**config, "run-name": "int8", "update-encoding": "int8"}
    simulate(simulation, run_config, 3)
    f32 = in_process_run({**config, "run-name": "float32"}, 3)

    # Assert: completed (checked by simulate), every reply accepted, about a quarter of
    # float32's bytes recorded
    history = json.loads((tmp_path / "int8" / "history.json").read_text())
    assert [r["train"]["replies-ok"] for r in history] == [3, 3]
    sizes = [i["train"]["bytes"] for r in history for i in r["instances"].values()]
    float32_bytes = ArrayRecord(build_model("trading-mlp").state_dict()).count_bytes()
    assert len(sizes) == 6 and max(sizes) <= 0.3 * float32_bytes
    assert all(
        r["train"]["bytes-received"] == sum(i["train"]["bytes"] for i in r["instances"].values())
        for r in history
    )

    # ... and a model within a few int8 steps of the float32 run's
    int8 = torch.load(tmp_path / "int8" / "final_model.pt", weights_only=True)
    initial = build_model("trading-mlp", seed=42).state_dict()
    for name, values in f32.items():
        moved = (values - initial[name]).abs().max().item()
        assert (int8[name] - values).abs().max().item() <= 0.05 * moved + 1e-6


@pytest.mark.parametrize(
    "values",
    [np.full((), 2.5, np.float32), np.zeros((0, 3), np.float32), np.arange(7.0)],
    ids=["0-d", "empty", "float64"],
)
def test_npy_array_writes_flowers_bytes_and_reads_back_in_place(values: np.ndarray) -> None:
    # The server's result Array: the bytes Array(ndarray) would hold, without np.save's copies
    array = npy_array(values, "float32")
    flower = Array(values.astype(np.float32))
    assert array.data == flower.data and array.dtype == flower.dtype
    assert tuple(array.shape) == tuple(flower.shape)
    np.testing.assert_array_equal(as_numpy(array), values.astype(np.float32))


def test_bytes_address_is_where_the_c_api_says_the_bytes_are() -> None:
    import ctypes

    c_api = ctypes.pythonapi.PyBytes_AsString
    c_api.argtypes, c_api.restype = (ctypes.py_object,), ctypes.c_void_p
    for data in (b"", b"x", bytes(range(256)) * 999, npy_array(np.arange(5.0)).data):
        assert bytes_address(data) == c_api(data)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: npy_array(v) for k, v in arrays.items()})


def test_a_layout_reads_its_own_records_in_place_and_no_others() -> None:
    # Prepare: the real model's arrays, and the same record as Flower serialises it
    arrays = model_arrays()
    sent = _record(arrays)
    layout = NpyLayout.of(sent)
    assert layout is not None and layout.float32

    # Execute / Assert: the same layout is read in place, views made only when asked for
    views = layout.views(_record(trained(arrays, seed=1)))
    assert views is not None and list(views) == list(arrays)
    assert layout.record_bytes == sent.count_bytes()
    for name, address in zip(views, views.addresses(), strict=True):
        assert views[name].ctypes.data == address and not views[name].flags.writeable
        np.testing.assert_array_equal(views[name], trained(arrays, seed=1)[name])
    # ... and screening counts its bytes as Flower does
    reply = Message(
        RecordDict(
            {
                "arrays": _record(trained(arrays, seed=1)),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        ),
        reply_to=Message(RecordDict(), dst_node_id=1, message_type="train"),
    )
    screened = screen_train_reply(reply, sent, layout.views(sent), layout)
    assert screened.ok and isinstance(screened.arrays, NpyViews)
    assert screened.payload_bytes == reply.content["arrays"].count_bytes()
    # Anything else is for the careful checks: other order, dtype, shape, npy order, payload
    names = list(arrays)
    first = next(k for k, v in arrays.items() if v.ndim == 2)
    reordered = _record({k: arrays[k] for k in reversed(names)})
    as_float64 = _record({**arrays, first: arrays[first].astype(np.float64)})
    reshaped = _record({**arrays, first: arrays[first].reshape(-1)})
    fortran = ArrayRecord({**{k: npy_array(v) for k, v in arrays.items()}})
    buffer = io.BytesIO()
    np.save(buffer, np.asfortranarray(arrays[first]))
    fortran[first] = Array(
        dtype="float32", shape=arrays[first].shape, stype="numpy.ndarray", data=buffer.getvalue()
    )
    short = _record(arrays)
    short[first] = Array(
        dtype="float32",
        shape=arrays[first].shape,
        stype="numpy.ndarray",
        data=sent[first].data[:-4],
    )
    subclassed = _record(arrays)
    subclassed[first] = Array(
        dtype="float32",
        shape=arrays[first].shape,
        stype="numpy.ndarray",
        data=type("Bytes", (bytes,), {})(sent[first].data),
    )
    for other in (reordered, as_float64, reshaped, fortran, short, subclassed):
        assert layout.views(other) is None


def test_fresh_arrays_write_in_place_through_their_views() -> None:
    fresh = FreshArrays({"w": (2, 3), "b": (0,)})
    assert fresh.values["w"].flags.writeable
    assert fresh.values["w"].ctypes.data == fresh.values.addresses()[0]
    fresh.values["w"][:] = [[1, 2, 3], [4, 5, 6]]
    record = fresh.record()
    np.testing.assert_array_equal(record["w"].numpy(), [[1, 2, 3], [4, 5, 6]])
    assert record["b"].numpy().shape == (0,)
    assert record["w"].data == npy_array(np.arange(1, 7, dtype=np.float32).reshape(2, 3)).data


def test_a_reply_in_another_npy_order_is_averaged_like_the_same_values_in_c_order() -> None:
    # The fast path does not know Fortran order; the careful one reads it in its own order
    glob = model_arrays()
    strategy = WeightedFedAvg()
    results = []
    for fortran in (False, True):
        strategy._sent = _record(glob)
        replies = []
        for node in (1, 2):
            local = trained(glob, seed=node)
            arrays = _record(local)
            if fortran and node == 2:
                name = next(k for k, v in local.items() if v.ndim == 2)
                buffer = io.BytesIO()
                np.save(buffer, np.asfortranarray(local[name]))
                arrays[name] = Array(
                    dtype="float32",
                    shape=local[name].shape,
                    stype="numpy.ndarray",
                    data=buffer.getvalue(),
                )
            content = RecordDict(
                {
                    "arrays": arrays,
                    "metrics": MetricRecord({"num-examples": 100 * node}),
                    META_KEY: ConfigRecord({"instance-id": f"inst-{node}"}),
                }
            )
            sent = Message(RecordDict(), dst_node_id=node, message_type="train")
            replies.append(Message(content, reply_to=sent))
        new, metrics = strategy.aggregate_train(1, replies)
        assert metrics["replies-ok"] == 2
        results.append({k: as_numpy(a).copy() for k, a in new.items()})
    for name in glob:
        assert results[0][name].tobytes() == results[1][name].tobytes()


RESIDUAL_FILES = ["residual.pt", "residual.r00001.pt", "residual.r00002.pt", "residual.r00003.pt"]
"""What an instance keeps after three rounds (keep-checkpoints = 3: up to four rounds)."""


def _encoded_run(tmp_path: Path, encoding: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Three rounds of two synthetic instances sending ``encoding`` updates; what the instances
    keep on their disk goes under ``tmp_path`` (not shared with other tests' runs)."""
    monkeypatch.setenv("SIGMAX_FL_CACHE_DIR", str(tmp_path / "instances" / "features"))
    return {
        "num-server-rounds": 3,
        "local-epochs": 1,
        "data-sources": "synthetic:2:seed=3:start=2018-01-01:end=2019-12-31",
        "min-available-nodes": 2,
        "outputs-dir": str(tmp_path),
        "update-encoding": encoding,
    }


@pytest.mark.parametrize("encoding", ["float32", "float16", "int8"])
def test_a_resumed_encoded_run_ends_with_the_unbroken_runs_weights(
    tmp_path: Path, encoding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    config = _encoded_run(tmp_path, encoding, monkeypatch)
    unbroken = in_process_run({**config, "run-name": "unbroken"}, 2)

    # Execute: fresh instances (new processes: nothing of an earlier round left in memory)
    # resume (a) a run stopped after round 2, under another run-name, and (b) a run without a
    # run-name that finished, from its round-2 checkpoint: its instances trained round 3
    # already and must go back to what they kept after round 2
    def run(run_config: dict, run_id: int) -> None:
        run_server_app(LoopbackGrid(simulated_nodes(run_config, run_id, 2), run_id), run_config)

    run({**config, "run-name": "stopped", "num-server-rounds": 2}, 11)
    run({**config, "run-name": "renamed", "resume-from": str(tmp_path / "stopped")}, 12)
    stopped = torch.load(tmp_path / "stopped" / "final_model.pt", weights_only=True)
    finished = {**config, "run-name": ""}
    run(finished, 21)
    (folder,) = tmp_path.glob("run-*")
    run({**finished, "resume-from": str(folder / "checkpoints" / "round-00002.pt")}, 22)
    rewound = torch.load(folder / "final_model.pt", weights_only=True)

    # Assert: each instance's round-3 update carried the error it held back after round 2,
    # so both resumed runs end with the unbroken run's weights, bit for bit
    for resumed in (stopped, rewound):
        assert unbroken.keys() == resumed.keys()
        for name in unbroken:
            assert torch.equal(unbroken[name], resumed[name]), name


def test_an_instance_that_lost_its_residual_restarts_it_from_zero_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a run stopped after round 2; one instance's disk then loses what it kept
    config = _encoded_run(tmp_path, "int8", monkeypatch)
    unbroken = in_process_run({**config, "run-name": "unbroken"}, 2)
    in_process_run({**config, "run-name": "lost", "num-server-rounds": 2}, 2)
    settings = on_instances(Settings.from_run_config({**config, "run-name": "lost"}))
    instance = "synthetic-0001"
    folder = kept.instance_dir(settings, 0, instance)
    assert sorted(p.name for p in folder.glob("residual*")) == RESIDUAL_FILES[:3]
    shutil.rmtree(folder)

    # Execute: resume
    with caplog.at_level(logging.INFO, logger="flwr.sigmax_fl.client_app"):
        resumed = in_process_run({**config, "run-name": "lost", "resume-from": "latest"}, 2)

    # Assert: the run finishes; the log names the instance and the round; that instance's
    # round-3 update lacks its held-back error, so the model is not the unbroken run's
    said = [r.getMessage() for r in caplog.records if "update-encoding residual" in r.message]
    assert len(said) == 1 and said[0].startswith(f"{instance}: no update-encoding residual")
    assert "before round 3" in said[0] and "starts from zero" in said[0]
    assert any(not torch.equal(unbroken[k], resumed[k]) for k in unbroken)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_what_an_instance_derives_from_its_data_is_readable_by_its_owner_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a umask that leaves new files readable by every user of the machine; data no
    # other test uses, so that its features are not already cached in this process's memory
    config = _encoded_run(tmp_path, "int8", monkeypatch)
    config["data-sources"] = "synthetic:2:seed=97:start=2018-01-01:end=2019-12-31"
    umask = os.umask(0o022)

    # Execute
    try:
        in_process_run({**config, "run-name": "modes", "num-server-rounds": 2}, 2)
    finally:
        os.umask(umask)

    # Assert: its feature cache and the residuals it keeps are its owner's alone, and so are
    # the folders made for them (their names are the instances' and the runs')
    instances = tmp_path / "instances"
    files = [p for p in instances.rglob("*") if p.is_file()]
    assert {".npz", ".json", ".pt", ""} == {p.suffix for p in files}  # "": the lock files
    modes = {str(p.relative_to(instances)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert modes == dict.fromkeys(modes, oct(0o600))
    folders = [instances, *(p for p in instances.rglob("*") if p.is_dir())]
    assert {"features", "personal"} <= {p.name for p in folders}
    modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders}
    assert modes == dict.fromkeys(modes, oct(0o700))


def test_two_runs_of_one_name_keep_their_state_apart_on_the_instances(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two servers with their own outputs folders give their runs the same folder
    # name; the instances' disk still holds the first run's residuals (rounds 1-3)
    config = {**_encoded_run(tmp_path, "int8", monkeypatch), "run-name": "same"}

    def run(outputs: str, run_id: int) -> dict[str, torch.Tensor]:
        run_config = {**config, "outputs-dir": str(tmp_path / outputs)}
        grid = LoopbackGrid(simulated_nodes(run_config, run_id, 2), run_id)
        run_server_app(grid, run_config)
        return torch.load(tmp_path / outputs / "same" / "final_model.pt", weights_only=True)

    first = run("a", 31)

    # Execute: a second run (another Flower run id), not resuming
    with caplog.at_level(logging.INFO, logger="flwr.sigmax_fl.client_app"):
        second = run("b", 32)

    # Assert: round 1 starts from zero error feedback without a word, every later round uses
    # this run's own residual and none of the first run's: the same seeds give the same model;
    # each run's state has a folder of its own (the run's key), and the first run's is intact
    assert not [r for r in caplog.records if "update-encoding residual" in r.message]
    assert all(torch.equal(first[k], second[k]) for k in first)
    held = [
        on_instances(Settings.from_run_config({**config, "outputs-dir": str(tmp_path / o)}))
        for o in ("a", "b")
    ]
    folders = [kept.instance_dir(s, 0, "synthetic-0000") for s in held]
    assert folders[0] != folders[1]
    assert all(sorted(p.name for p in f.glob("residual*")) == RESIDUAL_FILES for f in folders)
