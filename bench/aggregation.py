"""Aggregation speed against the memory-bandwidth floor, and what update compression costs.

Three measurements, each a function ``bench/run.py`` calls (or run this file alone:
``python -m bench.aggregation [--quick]``, which prints the results as JSON):

* :func:`aggregation_speed`: ``WeightedFedAvg.aggregate_train`` (screening included) and stock
  Flower's ``aggregate_arrayrecords`` on the same 10 good replies of P float32 parameters,
  against the floor ``(replies + 1) x P x 4 bytes / copy bandwidth``, with the parts of our
  time (screening, the one pass, building the result's record) and two limits of this
  machine: the time to only read the replies, and the time to write the result into fresh
  (never touched) pages.
* :func:`update_bytes`: bytes of one train reply of the real model per ``update-encoding``, as
  ``ArrayRecord.count_bytes()`` (what the run history records) and as serialised protobuf.
* :func:`compression_accuracy`: the app itself (ServerApp, strategy, ClientApp with its
  encoder and error feedback, Flower's message serialisation) over an in-process grid, on
  synthetic instances with a planted signal, once per encoding: test R^2 and bytes received.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/aggregation.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.timing import timeit

REPLIES = 10


def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 10) -> float:
    """Best read + write bytes per second of ``np.copyto`` into already-touched memory."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    dst[:] = 2.0  # touch every page before timing
    best = min(timeit(lambda: np.copyto(dst, src), reps))
    return 2 * nbytes / best


def layer_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """Four equal weight matrices plus 256-value biases, ``params`` values in all."""
    bias = 256
    rest = params - 4 * bias
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(4):
        n = rest // 4 if i < 3 else rest - 3 * (rest // 4)
        shapes[f"layer{i}.weight"] = (n // 1000, 1000) if n % 1000 == 0 else (n,)
        shapes[f"layer{i}.bias"] = (bias,)
    return shapes


def _round(params: int, replies: int, seed: int = 0) -> tuple[object, list[object]]:
    """A global model and ``replies`` good train replies to it, as the server receives them."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from sigmax_fl.strategy import META_KEY

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    rng = np.random.default_rng(seed)
    glob = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in layer_shapes(params).items()}
    out = []
    for node in range(1, replies + 1):
        sent = Message(RecordDict(), dst_node_id=node, message_type="train")
        arrays = ArrayRecord(
            {k: Array(v + rng.normal(0, 0.01, v.shape).astype(np.float32)) for k, v in glob.items()}
        )
        content = RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"num-examples": 1000 + node, "train_loss": 0.1}),
                META_KEY: ConfigRecord({"instance-id": f"inst-{node:02d}"}),
            }
        )
        out.append(Message(content, reply_to=sent))
    return ArrayRecord({k: Array(v) for k, v in glob.items()}), out


def aggregation_speed(
    params_list: tuple[int, ...] = (1_000_000, 10_000_000),
    replies: int = REPLIES,
    reps: int = 9,
    bandwidth: float | None = None,
) -> dict[str, object]:
    """Ours vs stock Flower vs the memory-bandwidth floor, and where our time goes.

    Returns ``{"copy_bandwidth_bytes_per_s": float, "rows": [one dict per P]}``; each row has
    medians (``*_s``) and minima (``*_min_s``) over ``reps`` runs, ``floor_s`` and the ratios
    ``ours_x_floor``, ``stock_x_floor``, ``ours_over_stock``, the parts of our time, and
    ``fused_kernel`` (whether the one pass ran in :mod:`sigmax_fl.fused`); ``kernel_build_s``
    is what building that kernel once costs a server process (None: not built here).

    Stock runs first, for every P: ``fused.prepare`` (what ``configure_train`` does for a
    large model) changes how this process's allocator keeps freed memory, and stock Flower's
    figures must be those of a process without it.
    """
    import warnings

    import torch
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from sigmax_fl import fused
    from sigmax_fl.codec import FreshArrays, NpyLayout
    from sigmax_fl.strategy import (
        WeightedFedAvg,
        capped_shares,
        norms_and_average,
        screen_train_reply,
    )

    warnings.filterwarnings("ignore", "The given NumPy array is not writable")
    bandwidth = bandwidth or copy_bandwidth()
    rounds = {params: _round(params, replies) for params in params_list}
    stock = {
        params: timeit(
            lambda m=messages: aggregate_arrayrecords([x.content for x in m], "num-examples"), reps
        )
        for params, (_, messages) in rounds.items()
    }
    rows = []
    for params, (glob, messages) in rounds.items():
        ours = WeightedFedAvg()
        ours._sent = glob
        shapes = {name: a.shape for name, a in glob.items()}
        fused.prepare(shapes)  # as configure_train does

        def run_ours(ours=ours, messages=messages) -> None:
            arrays, metrics = ours.aggregate_train(1, messages)
            assert arrays is not None and metrics["replies-ok"] == replies, metrics

        layout = NpyLayout.of(glob)
        sent = layout.views(glob)
        screened = [screen_train_reply(m, glob, sent, layout) for m in messages]
        models = [s.arrays for s in screened]
        shares = capped_shares([s.num_examples for s in screened], ours.defences.max_weight_share)
        out = FreshArrays(shapes).values
        tensors = [torch.from_numpy(v.reshape(-1)) for m in models for v in m.values()]

        def screening(messages=messages, glob=glob) -> None:
            layout = NpyLayout.of(glob)  # as aggregate_train does, once a round
            sent = layout.views(glob)
            for message in messages:
                screen_train_reply(message, glob, sent, layout)

        def read_only(tensors=tensors) -> None:
            for t in tensors:
                t.sum()  # reads every reply value once, on torch's threads

        def fresh_pages(params=params) -> None:
            np.ones(params, dtype=np.float32)  # first touch of never-used pages

        parts = {
            "ours": run_ours,
            "screening": screening,
            "one_pass": lambda m=models, s=sent, w=shares, o=out: norms_and_average(m, s, w, o),
            "result_record": lambda s=shapes: FreshArrays(s).record(),
            "read_replies_only": read_only,
            "fresh_pages_result_size": fresh_pages,
        }
        timings = {name: timeit(fn, reps) for name, fn in parts.items()}
        timings["stock"] = stock[params]
        floor = (replies + 1) * params * 4 / bandwidth
        row: dict[str, object] = {"params": params, "replies": replies, "reps": reps}
        row["floor_s"] = floor
        row["fused_kernel"] = fused.applies(sent)
        for name, ts in timings.items():
            row[f"{name}_s"] = statistics.median(ts)
            row[f"{name}_min_s"] = min(ts)
        row["rest_s"] = row["ours_s"] - sum(
            row[f"{name}_s"] for name in ("screening", "one_pass", "result_record")
        )
        row["ours_x_floor"] = row["ours_s"] / floor
        row["ours_min_x_floor"] = row["ours_min_s"] / floor
        row["stock_x_floor"] = row["stock_s"] / floor
        row["ours_over_stock"] = row["ours_s"] / row["stock_s"]
        print(
            f"[bench] aggregation P={params:,}: ours {row['ours_s'] * 1e3:.2f} ms "
            f"({row['ours_x_floor']:.2f}x floor), stock {row['stock_s'] * 1e3:.2f} ms "
            f"({row['stock_x_floor']:.2f}x), floor {floor * 1e3:.2f} ms",
            flush=True,
        )
        rows.append(row)
        del ours, screened, models, out, tensors
        gc.collect()
    started = time.perf_counter()
    kernel, _ = fused.build()  # once more, timed: what a server process pays once
    build_s = time.perf_counter() - started if kernel is not None else None
    return {"copy_bandwidth_bytes_per_s": bandwidth, "rows": rows, "kernel_build_s": build_s}


def update_bytes(model: str = "trading-mlp") -> dict[str, object]:
    """Bytes of one train reply per encoding, and their ratio to float32.

    ``arrayrecord_bytes`` is ``ArrayRecord.count_bytes()``, the figure the run history records
    per instance and round; ``reply_proto_bytes`` is the whole reply message as serialised
    protobuf (metrics and instance id included).
    """
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common.serde import message_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    from sigmax_fl.codec import ENCODING_KEY, ENCODINGS, encode_update
    from sigmax_fl.model import build_model
    from sigmax_fl.strategy import META_KEY

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    received = {k: v.numpy().copy() for k, v in build_model(model, seed=0).state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    local = {
        k: v + 0.01 * torch.randn(v.shape, generator=generator).numpy() for k, v in received.items()
    }
    down = Message(RecordDict({"arrays": ArrayRecord()}), dst_node_id=1, message_type="train")
    out: dict[str, object] = {"params": sum(v.size for v in received.values())}
    for encoding in ENCODINGS:
        arrays, _ = encode_update(local, received, encoding)
        meta = {"instance-id": "synthetic-0000", ENCODING_KEY: encoding}
        reply = Message(
            RecordDict(
                {
                    "arrays": arrays,
                    "metrics": MetricRecord({"num-examples": 1000, "train_loss": 0.1}),
                    META_KEY: ConfigRecord(meta),
                }
            ),
            reply_to=down,
        )
        out[encoding] = {
            "arrayrecord_bytes": arrays.count_bytes(),
            "reply_proto_bytes": message_to_proto(reply).ByteSize(),
        }
    for encoding in ENCODINGS:
        for key in ("arrayrecord_bytes", "reply_proto_bytes"):
            out[encoding][f"{key}_x_float32"] = out[encoding][key] / out["float32"][key]
    return out


def _app_run(encoding: str, setup: object, out_dir: Path) -> dict[str, float]:
    """One in-process run of the app with ``update-encoding``; test R^2 and bytes received."""
    import torch

    from sigmax_fl import metrics, runs, task
    from sigmax_fl.attacks import LoopbackGrid, run_server_app, simulated_nodes
    from sigmax_fl.data import parse_sources
    from sigmax_fl.dataset import Recipe, load_instance
    from sigmax_fl.model import build_model
    from sigmax_fl.settings import Settings

    run_id = 7000 + ("float32", "float16", "int8").index(encoding)
    run_config = {**setup.run_config(out_dir, encoding), "update-encoding": encoding}
    grid = LoopbackGrid(simulated_nodes(run_config, run_id, setup.instances), run_id)
    started = time.monotonic()
    run_server_app(grid, run_config)
    seconds = time.monotonic() - started
    settings = Settings.from_run_config(run_config)
    model = build_model(settings.model)
    model.load_state_dict(torch.load(out_dir / encoding / runs.FINAL_MODEL, weights_only=True))
    preds, ys = [], []
    for source in parse_sources(settings.data_sources, settings.data_dir):
        data = load_instance(source, Recipe.of(settings))
        preds.append(task.predict(model, data.X("test")))
        ys.append(data.y("test").astype(np.float64))
    history = runs.read_history(out_dir / encoding)
    received = [r["train"]["bytes-received"] for r in history]
    per_update = [
        i["train"]["bytes"] for r in history for i in r["instances"].values() if "train" in i
    ]
    return {
        "test_r2": metrics.r2_oos(np.concatenate(preds), np.concatenate(ys)),
        "bytes_received_per_round": float(np.mean(received)),
        "bytes_per_update": float(np.mean(per_update)),
        "seconds": seconds,
    }


def compression_accuracy(
    instances: int = 4, rounds: int = 5, local_epochs: int = 1, seed: int = 1
) -> dict[str, object]:
    """Test R^2 of the app trained with each ``update-encoding``, against float32's.

    Synthetic instances (``synthetic:N``, hourly bars 2017-2019) carry a planted linear signal,
    so R^2 measures learning rather than noise. The ratio ``r2_x_float32`` must be >= 0.99.
    """
    import torch

    from sigmax_fl.attacks import Setup

    torch.set_num_threads(1)
    setup = Setup(instances=instances, rounds=rounds, local_epochs=local_epochs, seed=seed)
    out: dict[str, object] = {
        "instances": instances,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "data_sources": setup.data_sources,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for encoding in ("float32", "float16", "int8"):
            out[encoding] = _app_run(encoding, setup, Path(tmp))
            print(f"[bench] update-encoding {encoding}: {out[encoding]}", flush=True)
    base = out["float32"]
    for encoding in ("float16", "int8"):
        row = out[encoding]
        row["r2_x_float32"] = row["test_r2"] / base["test_r2"]
        row["bytes_x_float32"] = row["bytes_per_update"] / base["bytes_per_update"]
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and print them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M parameters only, 5 runs")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args(argv)
    params = (1_000_000,) if args.quick else (1_000_000, 10_000_000)
    result = {
        "aggregation": aggregation_speed(params, reps=5 if args.quick else 9),
        "update_bytes": update_bytes(),
    }
    if not args.skip_accuracy:
        result["compression_accuracy"] = compression_accuracy()
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
