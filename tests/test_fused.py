"""The fused C aggregation pass: built with this machine's compiler, checked against float64."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from sigmax_fl import fused, strategy
from sigmax_fl.codec import FreshArrays, NpyLayout, as_numpy

from .conftest import in_process_run

ATOL = 4e-9
"""Float32 rounding of the deltas (about 0.01-0.04 here, ulp 1.9e-9) and of their sum: the
torch pass needs 2.3e-9 on the large-model case below, the kernel 2.7e-9 (it rounds every
product and every sum on its own)."""
# Sizes around the kernel's edges: below one 32-value step, ragged steps and tiles, empty,
# exactly one tile.
SHAPES = {
    "w1": (3, fused.TILE // 3 + 7),
    "b1": (31,),
    "w2": (fused.TILE + 33,),
    "empty": (0,),
    "b2": (1,),
    "t": (fused.TILE,),
}


@pytest.fixture
def kernel() -> None:
    compiler = shlex.split(os.environ.get("CC") or "cc")[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler '{compiler}' here: the kernel is not built, torch is used")
    assert fused.library() is not None, f"{compiler} is present but the kernel did not build"


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """Build state is per process (cached); a test that changes how it builds starts afresh."""
    fused.library.cache_clear()
    yield
    fused.library.cache_clear()


def models(
    replies: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(seed)
    glob = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
    ms = [
        {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in glob.items()}
        for _ in range(replies)
    ]
    weights = rng.random(replies)
    return glob, ms, weights / weights.sum()


def float64_average(glob, ms, weights) -> dict[str, np.ndarray]:
    pairs = list(zip(weights, ms, strict=True))
    return {
        k: g + sum(w * (m[k].astype(np.float64) - g) for w, m in pairs) for k, g in glob.items()
    }


def run(glob, ms, weights, threads: int = 2) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    out = {k: np.empty(v.shape, np.float32) for k, v in glob.items()}
    return fused.norms_and_average(ms, glob, list(weights), out, threads=threads), out


@pytest.mark.parametrize("replies", [1, 3, 8, 9, 17])
def test_average_and_norms_equal_float64(kernel: None, replies: int) -> None:
    # Prepare: 1 reply, less than one group of 8, exactly one, one more, two groups and a bit
    glob, ms, weights = models(replies)

    # Execute
    norms, out = run(glob, ms, weights)

    # Assert: within float32 rounding of the float64 mean, norms to 1e-6
    for name, expected in float64_average(glob, ms, weights).items():
        np.testing.assert_allclose(out[name], expected, rtol=2**-23, atol=ATOL)
    exact = [
        np.sqrt(sum(((m[k].astype(np.float64) - glob[k]) ** 2).sum() for k in glob)) for m in ms
    ]
    np.testing.assert_allclose(norms, exact, rtol=1e-6)


def test_arithmetic_is_the_documented_float32_sequence(kernel: None) -> None:
    # Bit for bit: g + (((w0 d0) + w1 d1) + ...), every operation rounded to float32
    glob, ms, weights = models(11, seed=7)
    _, out = run(glob, ms, weights)
    w32 = np.asarray(weights, dtype=np.float32)
    for name, g in glob.items():
        acc = w32[0] * (ms[0][name] - g)
        for w, m in zip(w32[1:], ms[1:], strict=True):
            acc = acc + w * (m[name] - g)
        assert out[name].tobytes() == (g + acc).tobytes()


def test_threads_do_not_change_a_bit(kernel: None) -> None:
    glob, ms, weights = models(10, seed=1)
    results = [run(glob, ms, weights, threads=t) for t in (1, 2, 3)]
    for norms, out in results[1:]:
        assert norms.tobytes() == results[0][0].tobytes()
        for name in glob:
            assert out[name].tobytes() == results[0][1][name].tobytes()


NO_THREADS = """
import logging, resource, sys
import numpy as np
from sigmax_fl import fused
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
assert fused.library() is not None
rng = np.random.default_rng(0)
glob = {"w": rng.normal(0, 0.1, 64 * fused.TILE).astype(np.float32)}
ms = [{"w": glob["w"] + rng.normal(0, 0.01, glob["w"].shape).astype(np.float32)} for _ in range(3)]
weights = [0.2, 0.3, 0.5]
alone = {"w": np.empty_like(glob["w"])}
alone_norms = fused.norms_and_average(ms, glob, weights, alone, threads=1)
out = {"w": np.empty_like(glob["w"])}
# Address space for this process as it is, 2 MiB more: no room for a thread's 8 MiB stack
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 20), hard))
norms = fused.norms_and_average(ms, glob, weights, out, threads=4)
resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
print("same:", norms.tobytes() == alone_norms.tobytes(), out["w"].tobytes() == alone["w"].tobytes())
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_threads_that_cannot_start_leave_the_pass_whole_and_are_reported(kernel: None) -> None:
    # Execute: a pass asked for 4 threads in a process with no room for another thread's stack
    done = subprocess.run(
        [sys.executable, "-c", NO_THREADS], capture_output=True, text=True, timeout=120
    )

    # Assert: the caller's thread took every tile (the same bits as one thread); it says so
    assert done.returncode == 0, done.stderr
    assert "3 of 4 thread(s) could not be started" in done.stdout
    assert "it ran on 1, more slowly" in done.stdout
    assert "same: True True" in done.stdout


def test_agrees_with_the_torch_pass(kernel: None, monkeypatch: pytest.MonkeyPatch) -> None:
    glob, ms, weights = models(10, seed=2)
    norms, out = run(glob, ms, weights)
    monkeypatch.setattr(fused, "MIN_PARAMS", 1 << 40)  # too large for the kernel: torch's pass
    torch_norms, torch_out = strategy.norms_and_average(ms, glob, list(weights))
    np.testing.assert_allclose(norms, torch_norms, rtol=1e-5)
    for name in glob:
        np.testing.assert_allclose(out[name], torch_out[name], rtol=2**-22, atol=4e-9)


def test_a_non_finite_value_shows_in_its_norm_only(kernel: None) -> None:
    # The strategy relies on this to send such a round down the exact path
    glob, ms, weights = models(9, seed=3)
    ms[4]["w2"][fused.TILE + 5] = np.inf
    ms[8]["b1"][30] = np.nan
    norms, _ = run(glob, ms, weights)
    assert not np.isfinite(norms[[4, 8]]).any()
    assert np.isfinite(np.delete(norms, [4, 8])).all()


def test_fortran_ordered_reply_is_read_in_its_own_order(kernel: None) -> None:
    glob, ms, weights = models(3, seed=4)
    ms[1]["w1"] = np.asfortranarray(ms[1]["w1"])
    norms, out = run(glob, ms, weights)
    expected_norms, expected = run(
        glob, [{k: np.ascontiguousarray(v) for k, v in m.items()} for m in ms], weights
    )
    assert norms.tobytes() == expected_norms.tobytes()
    assert out["w1"].tobytes() == expected["w1"].tobytes()


def test_no_compiler_leaves_the_torch_pass(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-sigmax")
    monkeypatch.setattr(fused, "MIN_PARAMS", 0)
    glob, ms, weights = models(4, seed=5)
    with caplog.at_level(logging.WARNING, logger="flwr.sigmax_fl.fused"):
        assert not fused.applies(glob)
        _, out = strategy.norms_and_average(ms, glob, list(weights))
    assert "no C compiler 'no-such-compiler-sigmax' (set CC)" in caplog.text
    for name, expected in float64_average(glob, ms, weights).items():
        np.testing.assert_allclose(out[name], expected, rtol=2**-23, atol=ATOL)


def test_a_compiler_that_fails_is_reported(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "false")  # exists, exits 1 for any input
    with caplog.at_level(logging.WARNING, logger="flwr.sigmax_fl.fused"):
        assert fused.library() is None
    assert "could not build it with 'false'" in caplog.text


def test_no_usable_temporary_directory_is_reported(
    kernel: None,
    fresh_library: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    # A server whose temporary directory is missing (or noexec) must still aggregate
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="flwr.sigmax_fl.fused"):
        assert fused.library() is None
    assert "could not build it with" in caplog.text and "gone" in caplog.text


def test_switched_off_by_the_environment(
    kernel: None, fresh_library: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    monkeypatch.setattr(fused, "MIN_PARAMS", 0)
    glob, _, _ = models(1)
    assert fused.library() is None
    assert not fused.applies(glob)


def test_a_compiler_refusing_native_flags_builds_the_same_kernel(
    kernel: None, fresh_library: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # -march=native is only a speed-up: the plain build must give the same bits
    glob, ms, weights = models(9, seed=8)
    native = run(glob, ms, weights)
    calls = tmp_path / "calls"
    wrapper = tmp_path / "cc-no-native"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'for a in "$@"; do\n'
        '  [ "$a" = -march=native ] && { echo "no -march=native" >&2; exit 1; }\n'
        "done\n"
        f'exec {shlex.split(os.environ.get("CC") or "cc")[0]} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    fused.library.cache_clear()
    assert fused.library() is not None
    tried = calls.read_text().splitlines()
    assert len(tried) == 2 and "-march=native" in tried[0] and "-march" not in tried[1]
    plain = run(glob, ms, weights)
    assert plain[0].tobytes() == native[0].tobytes()
    for name in glob:
        assert plain[1][name].tobytes() == native[1][name].tobytes()


def test_sizes_that_do_not_match_are_refused_before_the_c_loop(kernel: None) -> None:
    glob, ms, weights = models(3, seed=9)
    with pytest.raises(ValueError, match="3 model"):
        run(glob, ms, weights[:2])
    ms[2]["w2"] = ms[2]["w2"][:-1]
    with pytest.raises(ValueError, match="array 'w2'"):
        run(glob, ms, weights)


def test_npy_bytes_and_unaligned_arrays_give_the_same_bits(kernel: None) -> None:
    # In place in npy bytes (addresses from the bytes; the result streamed past the caches)
    # and as plain arrays with the result one float off alignment (ordinary stores)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    glob, ms, weights = models(10, seed=3)
    layout = NpyLayout.of(ArrayRecord({k: strategy.npy_array(v) for k, v in glob.items()}))
    in_npy = [
        layout.views(ArrayRecord({k: strategy.npy_array(v) for k, v in m.items()})) for m in ms
    ]
    reference = layout.views(ArrayRecord({k: strategy.npy_array(v) for k, v in glob.items()}))
    fresh = FreshArrays({k: v.shape for k, v in glob.items()})
    assert all(a % 16 == 0 for a in fresh.values.addresses())  # so the stores stream
    npy_norms = fused.norms_and_average(in_npy, reference, list(weights), fresh.values)
    out = {}
    for k, v in glob.items():
        out[k] = np.empty(v.size + 1, np.float32)[1:].reshape(v.shape)
        assert out[k].ctypes.data % 16 != 0 or v.size == 0
    plain_norms = fused.norms_and_average(ms, glob, list(weights), out)
    assert npy_norms.tobytes() == plain_norms.tobytes()
    for k in glob:
        assert fresh.values[k].tobytes() == out[k].tobytes()


def test_fresh_arrays_survive_flower_serialisation() -> None:
    # The average is written into the npy bytes Flower sends: they must be ordinary npy
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    fresh = FreshArrays({"w": (4, 5), "b": (3,)})
    fresh.values["w"][:] = np.arange(20, dtype=np.float32).reshape(4, 5)
    fresh.values["b"][:] = [-1.5, 0.0, 2.25]
    record = fresh.record()
    with pytest.raises(ValueError, match="read-only"):  # shared with Flower: no more writing
        fresh.values["w"][0, 0] = 1.0
    assert not fresh.values.writable
    message = Message(RecordDict({"arrays": record}), dst_node_id=2, message_type="train")
    back = message_from_proto(message_to_proto(message)).content["arrays"]
    assert isinstance(back, ArrayRecord)
    np.testing.assert_array_equal(back["w"].numpy(), np.arange(20).reshape(4, 5))
    np.testing.assert_array_equal(back["b"].numpy(), [-1.5, 0.0, 2.25])
    assert as_numpy(back["b"]).dtype == np.float32


def test_strategy_round_of_a_large_model_uses_the_kernel(kernel: None) -> None:
    # A model above MIN_PARAMS, end to end through aggregate_train, against float64
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    rng = np.random.default_rng(6)
    shapes = {"w": (fused.MIN_PARAMS // 100 + 1, 100), "b": (100,)}
    glob = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}
    replies, models_, examples = [], [], [300, 1200, 500]
    for node, n in enumerate(examples, start=1):
        m = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in glob.items()}
        models_.append(m)
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: strategy.npy_array(v) for k, v in m.items()}),
                "metrics": MetricRecord({"num-examples": n}),
                strategy.META_KEY: ConfigRecord({"instance-id": f"inst-{node}"}),
            }
        )
        sent = Message(RecordDict(), dst_node_id=node, message_type="train")
        replies.append(Message(content, reply_to=sent))
    wfa = strategy.WeightedFedAvg(defences=strategy.Defences(max_weight_share=1.0))
    wfa._sent = ArrayRecord({k: strategy.npy_array(v) for k, v in glob.items()})
    fused.prepare({k: v.shape for k, v in glob.items()})
    assert fused.applies(glob)

    result, metrics = wfa.aggregate_train(1, replies)

    assert metrics["replies-ok"] == 3
    shares = np.array(examples) / sum(examples)
    w32 = shares.astype(np.float32)
    for name, expected in float64_average(glob, models_, shares).items():
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=2**-23, atol=ATOL)
        # and bit for bit the kernel's documented float32 sequence
        acc = w32[0] * (models_[0][name] - glob[name])
        for w, m in zip(w32[1:], models_[1:], strict=True):
            acc = acc + w * (m[name] - glob[name])
        assert as_numpy(result[name]).tobytes() == (glob[name] + acc).tobytes()


def test_the_app_trains_the_same_model_on_either_pass(
    kernel: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: the app in process (ServerApp, ClientApps, Flower's message serialisation) on
    # three instances for two rounds, once with every pass in the kernel, as a large model has
    config = {
        "num-server-rounds": 2,
        "local-epochs": 1,
        "data-sources": "synthetic:3:seed=3:signal=0.3:start=2018-01-01:end=2019-12-31",
        "min-available-nodes": 3,
        "outputs-dir": str(tmp_path),
    }

    # Execute
    monkeypatch.setattr(fused, "MIN_PARAMS", 0)
    assert fused.applies({"w": np.zeros(1, np.float32)})
    with_kernel = in_process_run({**config, "run-name": "fused"}, 3)
    monkeypatch.setattr(fused, "MIN_PARAMS", 1 << 40)
    with_torch = in_process_run({**config, "run-name": "torch"}, 3)

    # Assert: the same model up to float32 rounding carried through a round of training
    assert with_kernel.keys() == with_torch.keys()
    for name, values in with_kernel.items():
        np.testing.assert_allclose(values.numpy(), with_torch[name].numpy(), rtol=1e-4, atol=1e-6)
