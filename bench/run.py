"""`make bench`: aggregation, data, communication and simulation timings on this machine.

Run as ``python -m bench.run`` (or ``python bench/run.py``) from the project root. Writes
``bench/results.json`` and ``bench/results.md``. Everything is measured in this run: medians
of several repetitions, ratios taken between numbers of the same run. Nothing here changes
the app; it only measures it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = Path(__file__).resolve().parent
MODEL_PARAMS = 14_849
NOT_MEASURED = "not measured this session"


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 2)
    return float("nan")


def machine() -> dict[str, object]:
    """What this machine and environment are."""
    import flwr
    import torch

    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)),
        "memory_gib": _mem_total_gib(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "flwr": flwr.__version__,
    }


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- helpers


def timeit(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``reps`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def med(values: list[float]) -> float:
    """Median as a float."""
    return float(statistics.median(values))


# --------------------------------------------------------------------------- 1. aggregation


def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 10) -> float:
    """Best read+write bytes per second of ``np.copyto`` into already-touched memory."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    dst[:] = 2.0  # touch every page before timing
    best = min(timeit(lambda: np.copyto(dst, src), reps, warmup=1))
    return 2 * nbytes / best


def _layers(params: int) -> dict[str, tuple[int, ...]]:
    """The real model's shapes at 15k; at larger sizes a few layers summing to ``params``."""
    if params == MODEL_PARAMS:
        from sigmax_fl.model import build_model

        model = build_model("trading-mlp", seed=0)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # four weight matrices of equal size plus small biases, exactly `params` in total
    bias = 256
    rest = params - 4 * bias
    cols = 1000
    shapes: dict[str, tuple[int, ...]] = {}
    left = rest
    for i in range(4):
        n = rest // 4 if i < 3 else left
        left -= n
        if n % cols == 0:
            shapes[f"layer{i}.weight"] = (n // cols, cols)
        else:
            shapes[f"layer{i}.weight"] = (n,)
        shapes[f"layer{i}.bias"] = (bias,)
    assert sum(int(np.prod(s)) for s in shapes.values()) == params
    return shapes


def aggregation(params_list: list[int], replies_n: int, bandwidth: float) -> list[dict]:
    """``WeightedFedAvg.aggregate_train`` (screening included) vs stock ``FedAvg``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from sigmax_fl.strategy import META_KEY, WeightedFedAvg

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    rows = []
    for params in params_list:
        shapes = _layers(params)
        rng = np.random.default_rng(params)
        glob = {k: rng.normal(0, 0.1, size=s).astype(np.float32) for k, s in shapes.items()}
        glob_rec = ArrayRecord({k: Array(v) for k, v in glob.items()})

        def make_replies(with_meta: bool, glob=glob, rng=rng) -> list[Message]:
            out = []
            for node in range(1, replies_n + 1):
                sent = Message(RecordDict(), dst_node_id=node, message_type="train")
                vals = {
                    k: (v + rng.normal(0, 0.01, size=v.shape).astype(np.float32))
                    for k, v in glob.items()
                }
                content = {
                    "arrays": ArrayRecord({k: Array(v) for k, v in vals.items()}),
                    "metrics": MetricRecord({"num-examples": 1000 + node, "train_loss": 0.1}),
                }
                if with_meta:
                    content[META_KEY] = ConfigRecord({"instance-id": f"inst-{node:02d}"})
                out.append(Message(RecordDict(content), reply_to=sent))
            return out

        ours_replies = make_replies(True)
        ours = WeightedFedAvg()

        def run_ours(ours=ours, replies=ours_replies, glob_rec=glob_rec) -> None:
            ours._sent = glob_rec
            arrays, metrics = ours.aggregate_train(1, replies)
            assert arrays is not None and metrics["replies-ok"] == replies_n, metrics

        reps = 21 if params < 1_000_000 else 9 if params == 1_000_000 else 5
        t_ours = timeit(run_ours, reps)
        del ours_replies
        gc.collect()

        stock_replies = make_replies(False)
        stock = FedAvg()

        def run_stock(stock=stock, replies=stock_replies) -> None:
            arrays, _ = stock.aggregate_train(1, replies)
            assert arrays is not None

        t_stock = timeit(run_stock, reps)
        del stock_replies
        gc.collect()

        floor = (replies_n + 1) * params * 4 / bandwidth
        row = {
            "params": params,
            "replies": replies_n,
            "reps": reps,
            "floor_s": floor,
            "weighted_fedavg_s": med(t_ours),
            "weighted_fedavg_all_s": t_ours,
            "stock_fedavg_s": med(t_stock),
            "stock_fedavg_all_s": t_stock,
        }
        row["weighted_fedavg_min_s"] = min(t_ours)
        row["stock_fedavg_min_s"] = min(t_stock)
        row["weighted_fedavg_x_floor"] = row["weighted_fedavg_s"] / floor
        row["stock_fedavg_x_floor"] = row["stock_fedavg_s"] / floor
        row["weighted_over_stock"] = row["weighted_fedavg_s"] / row["stock_fedavg_s"]
        print(
            f"[bench] aggregation P={params:,}: ours {row['weighted_fedavg_s']:.4f}s "
            f"({row['weighted_fedavg_x_floor']:.1f}x floor), stock {row['stock_fedavg_s']:.4f}s "
            f"({row['stock_fedavg_x_floor']:.1f}x floor)",
            flush=True,
        )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- 2. data


def data_load(reps: int = 5) -> dict:
    """Load (policy repair) + featurise the 20,000-bar hourly file."""
    from sigmax_fl.data import load_ohlcv
    from sigmax_fl.features import make_features

    path = ROOT / "data" / "Coinbase_BTCUSD_1h.csv"
    load_t, feat_t = [], []
    bars = None
    for _ in range(reps):
        start = time.perf_counter()
        bars = load_ohlcv(str(path), policy="repair")
        mid = time.perf_counter()
        X, _ = make_features(bars)
        end = time.perf_counter()
        load_t.append(mid - start)
        feat_t.append(end - mid)
    assert bars is not None
    total = [a + b for a, b in zip(load_t, feat_t, strict=True)]
    out = {
        "file": str(path.relative_to(ROOT)),
        "bars": len(bars),
        "feature_rows": len(X),
        "reps": reps,
        "load_s": med(load_t),
        "featurise_s": med(feat_t),
        "total_s": med(total),
        "total_all_s": total,
    }
    print(f"[bench] data: {out['bars']} bars, load+featurise {out['total_s']:.3f}s", flush=True)
    return out


# --------------------------------------------------------------------------- memory sampler


class TreeMemory:
    """Peak summed RSS and PSS of every process started for a run.

    That is this process's descendants and every process carrying ``marker`` in its
    environment (Ray workers may be re-parented), sampled every ``interval`` seconds.
    """

    def __init__(self, marker: str, interval: float = 0.25) -> None:
        self.marker = marker.encode()
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._env_match: dict[int, bool] = {}

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _pids(self) -> set[int]:
        me = os.getpid()
        parents: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        found: set[int] = set()
        todo = [me]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        for pid in parents:
            if pid in found or pid == me:
                continue
            if pid not in self._env_match:
                try:
                    self._env_match[pid] = self.marker in Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    self._env_match[pid] = False
            if self._env_match[pid]:
                found.add(pid)
        return found

    def sample(self) -> None:
        """Add one sample of the summed memory."""
        rss = pss = 0
        pids = self._pids()
        for pid in pids:
            try:
                rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
            except (OSError, ValueError, IndexError):
                continue
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(pids))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


# --------------------------------------------------------------------------- 4. floor


def _settings(overrides: dict[str, object]):
    import tomllib

    from sigmax_fl.settings import Settings

    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return Settings.from_run_config({**base, **overrides})


def torch_floor(overrides: dict[str, object], reps: int = 3) -> dict:
    """The same local training as one round, sequentially, without Flower.

    Loads every instance's arrays through the app's own cache (so the simulation that follows
    reads them from disk, as a warm instance would), then times ``task.train`` for
    ``local-epochs`` over each instance's training rows, one thread, fresh model per instance.
    Also times ``task.evaluate`` on validation rows (the round's second phase) separately.
    """
    import torch

    from sigmax_fl import task
    from sigmax_fl.data import parse_sources
    from sigmax_fl.dataset import Recipe, load_instance
    from sigmax_fl.model import build_model

    s = _settings(overrides)
    recipe = Recipe.of(s)
    start = time.perf_counter()
    data = [load_instance(src, recipe) for src in parse_sources(s.data_sources, s.data_dir)]
    prepare = time.perf_counter() - start
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ClientApp does
    try:
        initial = build_model(s.model, seed=s.seed).state_dict()

        def one_round_train() -> None:
            for i, d in enumerate(data):
                model = build_model(s.model)
                model.load_state_dict(initial)
                task.train(
                    model,
                    d.X("train"),
                    d.y("train"),
                    epochs=s.local_epochs,
                    batch_size=s.batch_size,
                    learning_rate=s.learning_rate,
                    optimizer=s.optimizer,
                    seed=i,
                )

        def one_round_eval() -> None:
            for d in data:
                model = build_model(s.model)
                model.load_state_dict(initial)
                task.evaluate(model, d.X("val"), d.y("val"))

        t_train = timeit(one_round_train, reps)
        t_eval = timeit(one_round_eval, reps)
    finally:
        torch.set_num_threads(threads)
    rows = [d.rows("train") for d in data]
    return {
        "instances": len(data),
        "train_rows_per_instance": int(statistics.median(rows)),
        "prepare_data_s": prepare,
        "reps": reps,
        "train_s": med(t_train),
        "train_all_s": t_train,
        "evaluate_s": med(t_eval),
    }


# --------------------------------------------------------------------------- 4. simulation


def _flwr_run(
    n: int, app_dir: Path, run_config: dict[str, object], work: Path, timeout: float
) -> dict:
    """``flwr run`` of an app on a private simulation SuperLink; all its processes stopped."""
    from sigmax_fl.deploy.flwr_cli import FINISHED_OK, FlwrHome, start_superlink
    from sigmax_fl.deploy.processes import Supervisor

    home_dir = (work / "flwr-home").resolve()
    supervisor = Supervisor(work / "logs")
    t0 = time.perf_counter()
    with (
        TreeMemory(f"FLWR_HOME={home_dir}") as mem,
        supervisor,
        FlwrHome(home_dir) as home,
        (work / "run.log").open("w") as sink,
    ):
        link = start_superlink(supervisor, home, work / "state.db", simulation=True)
        t_link = time.perf_counter()
        home.add_connection("bench", link.address)
        run_id = home.run_app(
            app_dir,
            "bench",
            run_config=run_config,
            federation_config={"num-supernodes": n},
            sink=sink,
            timeout=timeout,
        )
        t_run = time.perf_counter()
        status = home.run_status(run_id, "bench")
    t_stop = time.perf_counter()
    left = supervisor.remaining()
    assert status == FINISHED_OK, status
    return {
        "instances": n,
        "run_config": run_config,
        "status": status,
        "processes_left": left,
        "superlink_start_s": t_link - t0,
        "run_wall_s": t_run - t_link,
        "total_wall_s": t_stop - t0,
        "stop_s": t_stop - t_run,
        "peak_rss_all_processes_mib": mem.peak_rss / 2**20,
        "peak_pss_all_processes_mib": mem.peak_pss / 2**20,
        "peak_processes": mem.peak_procs,
    }


def _timings(result: dict, seconds: list[float], label: str) -> dict:
    result.update(
        {
            "round_seconds": seconds,
            "first_round_s": seconds[0],
            "steady_round_s": med(seconds[1:]) if len(seconds) > 1 else None,
            "run_outside_rounds_s": result["run_wall_s"] - sum(seconds),
        }
    )
    print(
        f"[bench] {label} n={result['instances']}: first {seconds[0]:.2f}s, steady "
        f"{_fmt(result['steady_round_s'])}s, wall {result['run_wall_s']:.1f}s, peak RSS "
        f"{result['peak_rss_all_processes_mib']:.0f} MiB, left {result['processes_left']}",
        flush=True,
    )
    return result


def simulate_stock(n: int, overrides: dict[str, object], work: Path, timeout: float) -> dict:
    """The stock Flower FedAvg app in ``bench/stock_app`` under the same settings."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "stock-seconds.json"
    run_config = {
        "num-server-rounds": overrides["num-server-rounds"],
        "local-epochs": overrides["local-epochs"],
        "fraction-evaluate": overrides["fraction-evaluate"],
        "num-instances": n,
        "bench-out": str(out),
    }
    result = _flwr_run(n, OUT_DIR / "stock_app", run_config, work, timeout)
    seconds = [float(x) for x in json.loads(out.read_text())["seconds"]]
    return _timings(result, seconds, "stock")


def simulate(n: int, overrides: dict[str, object], work: Path, timeout: float) -> dict:
    """The real app via ``flwr run`` on a private simulation SuperLink; all stopped after."""
    work.mkdir(parents=True, exist_ok=True)
    outputs = work / "outputs"
    run_config = {**overrides, "outputs-dir": str(outputs), "run-name": f"bench-{n}"}
    result = _flwr_run(n, ROOT, run_config, work, timeout)
    history = json.loads((outputs / f"bench-{n}" / "history.json").read_text())
    seconds = [float(r["seconds"]) for r in history]
    per_round = []
    for r in history:
        inst = r["instances"]
        up = [v["train"]["bytes"] for v in inst.values() if "train" in v]
        n_train = sum(1 for v in inst.values() if "train" in v)
        n_eval = sum(1 for v in inst.values() if "evaluate" in v)
        per_round.append(
            {
                "round": r["round"],
                "seconds": r["seconds"],
                "bytes_sent": r["bytes_sent"],
                "bytes_received": r["train"].get("bytes-received"),
                "train_replies": n_train,
                "evaluate_replies": n_eval,
                "up_bytes_per_instance_median": int(statistics.median(up)) if up else None,
            }
        )
    last = per_round[-1]
    # bytes_sent = model bytes x (train messages + evaluate messages)
    per_msg = last["bytes_sent"] / (last["train_replies"] + last["evaluate_replies"])
    down_train = per_msg
    down_total = last["bytes_sent"] / n
    up = last["up_bytes_per_instance_median"]
    result["rounds"] = per_round
    result["comm"] = {
        "down_bytes_per_train_message": down_train,
        "down_bytes_per_instance_per_round": down_total,
        "up_bytes_per_instance_per_round": up,
    }
    _timings(result, seconds, "sigmax-fl")
    return result


def wire_bytes() -> dict:
    """Serialised (protobuf) size of a train message and its reply for the real model."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common.serde import message_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    from sigmax_fl.model import build_model
    from sigmax_fl.strategy import META_KEY

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    arrays = ArrayRecord(build_model("trading-mlp", seed=0).state_dict())
    config = ConfigRecord({"server-round": 1})
    down = Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type="train"
    )
    up = Message(
        RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"num-examples": 1000, "train_loss": 0.1}),
                META_KEY: ConfigRecord({"instance-id": "synthetic-0000"}),
            }
        ),
        reply_to=down,
    )
    return {
        "params": sum(int(np.prod(a.shape)) for a in arrays.values()),
        "raw_param_bytes": sum(int(np.prod(a.shape)) for a in arrays.values()) * 4,
        "arrayrecord_count_bytes": arrays.count_bytes(),
        "train_message_proto_bytes": message_to_proto(down).ByteSize(),
        "train_reply_proto_bytes": message_to_proto(up).ByteSize(),
    }


# --------------------------------------------------------------------------- report


def _fmt(x: object, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _targets(res: dict) -> list[str]:
    """Issue 7's targets against this run's numbers (measured only, nothing tuned)."""
    sims = {r["instances"]: r for r in res["simulation"] if "round_seconds" in r}
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "not met")

    r100 = sims.get(100)
    x = r100["steady_round_s"] / r100["floor"]["train_s"] if r100 else None
    rows.append(
        ("steady round at 100 instances <= 1.5x floor", f"{x:.2f}x" if x else "-",
         verdict(None if x is None else x <= 1.5))
    )  # fmt: skip
    r10 = sims.get(10)
    x = r10.get("steady_over_stock") if r10 else None
    rows.append(
        ("steady round at 10 instances <= 0.6x stock", f"{x:.2f}x" if x else "-",
         verdict(None if x is None else x <= 0.6))
    )  # fmt: skip
    firsts = [r["first_round_s"] for r in sims.values()]
    x = max(firsts) if firsts else None
    rows.append(
        ("first round <= 6 s (worst of the runs)", f"{x:.1f} s" if x else "-",
         verdict(None if x is None else x <= 6.0))
    )  # fmt: skip
    r1000 = sims.get(1000)
    if r1000:
        wall, peak = r1000["run_wall_s"], r1000["peak_rss_all_processes_mib"] / 1024
        rows.append(
            ("1,000 instances, 5 rounds < 10 min, < 4 GB", f"{wall:.0f} s, {peak:.1f} GiB",
             verdict(wall < 600 and peak < 4))
        )  # fmt: skip
    else:
        rows.append(("1,000 instances, 5 rounds < 10 min, < 4 GB", "-", NOT_MEASURED))
    for a in res["aggregation"]:
        if a["params"] >= 1_000_000:
            x = a["weighted_fedavg_x_floor"]
            rows.append(
                (f"WeightedFedAvg at {a['params']:,} params <= 1.5x floor", f"{x:.1f}x",
                 verdict(x <= 1.5))
            )  # fmt: skip
    c = res.get("communication", {})
    up = c.get("up_bytes_per_instance_per_round")
    x = up / c["raw_param_bytes"] if up else None
    rows.append(
        ("update bytes <= 0.55x (float16) / 0.3x (int8) of float32", f"{x:.3f}x raw" if x else "-",
         "no compression in the tree (float32 only)")
    )  # fmt: skip
    out = ["", "## Issue 7 targets against this run", "", "| target | measured | verdict |"]
    out.append("|---|---|---|")
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return out


def markdown(res: dict) -> str:
    """The results as a Markdown document with tables."""
    m = res["machine"]
    lines = [
        "# sigmax-fl bench results",
        "",
        f"Produced by `python -m bench.run` on {res['started']} UTC in {res['wall_s']:.0f} s.",
        "",
        f"Machine: {m['cpu_model']}, nproc {m['nproc']}, {m['memory_gib']} GiB RAM; "
        f"Python {m['python']}, torch {m['torch']}, flwr {m['flwr']}, numpy {m['numpy']}. "
        f"Load average (1/5/15 min) at start {res['load_start']}, at end {res['load_end']} "
        "(other work on this machine during the run slows every number).",
        "",
        "## Aggregation (10 good replies, float32; median seconds)",
        "",
        f"Copy bandwidth (best `np.copyto`, read+write): {res['copy_bandwidth_gbs']:.2f} GB/s. "
        "Floor = (10 replies read + 1 result written) x P x 4 bytes / copy bandwidth.",
        "",
        "| parameters | reps | floor s | WeightedFedAvg s (min) | x floor | stock FedAvg s (min) "
        "| x floor | WeightedFedAvg / stock |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["aggregation"]:
        lines.append(
            f"| {r['params']:,} | {r['reps']} | {_fmt(r['floor_s'])} | "
            f"{_fmt(r['weighted_fedavg_s'])} ({_fmt(r['weighted_fedavg_min_s'])}) | "
            f"{r['weighted_fedavg_x_floor']:.1f}x | "
            f"{_fmt(r['stock_fedavg_s'])} ({_fmt(r['stock_fedavg_min_s'])}) | "
            f"{r['stock_fedavg_x_floor']:.1f}x | {r['weighted_over_stock']:.2f} |"
        )
    lines += [
        "",
        "At 15k parameters the floor is far below per-call overhead (the data fits in cache): "
        "the ratio there measures fixed costs, not bandwidth.",
    ]
    d = res["data"]
    lines += [
        "",
        "## Data",
        "",
        f"| file | bars | feature rows | load s | featurise s | total s (median of {d['reps']}) |",
        "|---|---|---|---|---|---|",
        f"| {d['file']} | {d['bars']:,} | {d['feature_rows']:,} | {_fmt(d['load_s'])} | "
        f"{_fmt(d['featurise_s'])} | {_fmt(d['total_s'])} |",
    ]
    c = res["communication"]
    lines += [
        "",
        "## Communication (per instance per round)",
        "",
        f"Raw parameter bytes: {c['raw_param_bytes']:,} ({c['params']:,} float32).",
        "",
        "| quantity | bytes | x raw |",
        "|---|---|---|",
    ]
    raw = c["raw_param_bytes"]
    for label, key in (
        ("ArrayRecord.count_bytes (model)", "arrayrecord_count_bytes"),
        ("train message, serialised (down)", "train_message_proto_bytes"),
        ("train reply, serialised (up)", "train_reply_proto_bytes"),
        ("up per instance per round (history, train.bytes)", "up_bytes_per_instance_per_round"),
        ("down per instance per round, train only (history)", "down_bytes_per_train_message"),
        (
            "down per instance per round, train + evaluate (history bytes_sent / n)",
            "down_bytes_per_instance_per_round",
        ),
    ):
        v = c.get(key)
        lines.append(
            f"| {label} | {_fmt(v) if v is not None else '-'} | {(v / raw if v else 0):.3f} |"
        )
    lines += [
        "",
        "## Simulation (real app, `flwr run`, synthetic data, "
        f"{res['sim_settings']['num-server-rounds']} rounds, local-epochs "
        f"{res['sim_settings']['local-epochs']})",
        "",
        "Steady = median of rounds 2..N from history.json `seconds` (train + evaluate phases). "
        "First round includes Ray and actor start-up. Floor = the same `task.train` over every "
        "instance's training rows, sequentially, one torch thread, no Flower (evaluate excluded; "
        "shown separately). Peak memory = summed RSS (and PSS, shared pages split) of every "
        "process started for the run, sampled every 0.25 s.",
        "",
        "| instances | train rows/inst | run wall s | first round s | steady round s | "
        "floor train s | floor eval s | steady / floor | peak RSS MiB | peak PSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["simulation"]:
        n = row["instances"]
        if "error" in row or "skipped" in row:
            why = row.get("error") or row.get("skipped")
            lines.append(f"| {n:,} | {why} |  |  |  |  |  |  |  |  |")
            continue
        f = row["floor"]
        ratio = row["steady_round_s"] / f["train_s"] if row.get("steady_round_s") else None
        lines.append(
            f"| {n:,} | {f['train_rows_per_instance']:,} | {row['run_wall_s']:.1f} | "
            f"{row['first_round_s']:.2f} | {_fmt(row['steady_round_s'])} | {_fmt(f['train_s'])} | "
            f"{_fmt(f['evaluate_s'])} | {(f'{ratio:.1f}x' if ratio else '-')} | "
            f"{row['peak_rss_all_processes_mib']:.0f} | {row['peak_pss_all_processes_mib']:.0f} |"
        )
    stock_rows = [r for r in res["simulation"] if "stock" in r]
    if stock_rows:
        lines += [
            "",
            "### Stock Flower app, same runs (see notes)",
            "",
            "| instances | run wall s | first round s | steady round s | steady / floor | "
            "sigmax-fl steady / stock steady | peak RSS MiB | peak PSS MiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in stock_rows:
            st = row["stock"]
            if "error" in st or "skipped" in st:
                why = st.get("error") or st.get("skipped")
                lines.append(f"| {row['instances']:,} | {why} |  |  |  |  |  |  |")
                continue
            ratio = st["steady_round_s"] / row["floor"]["train_s"]
            lines.append(
                f"| {row['instances']:,} | {st['run_wall_s']:.1f} | {st['first_round_s']:.2f} | "
                f"{_fmt(st['steady_round_s'])} | {ratio:.1f}x | "
                f"{_fmt(row.get('steady_over_stock'))} | "
                f"{st['peak_rss_all_processes_mib']:.0f} | {st['peak_pss_all_processes_mib']:.0f} |"
            )
    lines += _targets(res)
    lines += ["", "Per-round seconds (round 1 first):", ""]
    for row in res["simulation"]:
        if "round_seconds" in row:
            stock = row.get("stock", {}).get("round_seconds")
            lines.append(
                f"- {row['instances']} instances: sigmax-fl {row['round_seconds']}"
                + (f"; stock {stock}" if stock else "")
            )
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in res["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def _wall_parts(row: dict) -> tuple[int, float, float]:
    """(instances, fixed seconds, seconds of rounds 2..N) of a finished run."""
    variable = float(row["steady_round_s"] or 0.0) * (len(row["round_seconds"]) - 1)
    return row["instances"], float(row["total_wall_s"]) - variable, variable


def _estimate(last: tuple[int, float, float] | None, n: int) -> float:
    """Guess a run's wall seconds from a smaller run of the same app.

    Start-up and stop x1.5, rounds 2..N x (n / n_prev) ** 1.5 (Flower's in-memory message
    lookup grows faster than linearly).
    """
    if last is None:
        return 0.0
    prev_n, fixed, variable = last
    return 1.5 * fixed + variable * (n / prev_n) ** 1.5


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--instances", default="3,10,100,1000", help="simulated instances to run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--budget",
        type=float,
        default=780.0,
        help="seconds; a larger simulation is skipped if it would likely not fit",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--no-stock", action="store_true", help="skip the stock Flower app")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    res: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": machine(),
        "load_start": loadavg(),
        "notes": [],
    }
    print(f"[bench] machine {res['machine']}, load {res['load_start']}", flush=True)

    # best of several measurements (others' work on this machine only ever slows a copy)
    samples = [copy_bandwidth() for _ in range(3)]
    bandwidth = max(samples)
    res["copy_bandwidth_gbs"] = bandwidth / 1e9
    res["copy_bandwidth_samples_gbs"] = [x / 1e9 for x in samples]
    res["aggregation"] = aggregation([MODEL_PARAMS, 1_000_000, 10_000_000], 10, bandwidth)
    gc.collect()
    res["data"] = data_load()

    with tempfile.TemporaryDirectory(prefix="sigmax-fl-bench-") as tmp:
        work = Path(tmp)
        # Instances' feature cache, private to this run: the floor builds it, the simulation
        # reads it from disk (as a warm instance would).
        os.environ["SIGMAX_FL_CACHE_DIR"] = str(work / "feature-cache")
        sim_settings: dict[str, object] = {
            "num-server-rounds": args.rounds,
            "local-epochs": 1,
            "round-timeout": 600.0,
            "fraction-train": 1.0,
            "fraction-evaluate": 1.0,
        }
        res["sim_settings"] = sim_settings
        res["simulation"] = []
        last_sigmax: tuple[int, float, float] | None = None
        last_stock: tuple[int, float, float] | None = None
        counts = [int(x) for x in args.instances.split(",") if x]
        for n in counts:
            overrides = {
                **sim_settings,
                "data-sources": f"synthetic:{n}",
                "min-available-nodes": n,
            }
            if n >= 100:
                overrides["fraction-evaluate"] = 0.1
            elapsed = time.perf_counter() - t_start
            guess = _estimate(last_sigmax, n)
            if elapsed + guess > args.budget:
                res["simulation"].append(
                    {"instances": n, "skipped": f"skipped: budget (est. {guess:.0f} s)"}
                )
                res["notes"].append(
                    f"{n} instances skipped: estimated {guess:.0f} s would exceed the "
                    f"{args.budget:.0f} s budget after {elapsed:.0f} s."
                )
                continue
            try:
                floor = torch_floor(overrides)
                print(
                    f"[bench] floor n={n}: train {floor['train_s']:.3f}s/round "
                    f"(data prepared in {floor['prepare_data_s']:.1f}s)",
                    flush=True,
                )
                left = args.budget - (time.perf_counter() - t_start)
                row = simulate(n, overrides, work / f"sim-{n}", timeout=max(120.0, left))
                row["floor"] = floor
                row["steady_over_floor"] = (
                    row["steady_round_s"] / floor["train_s"] if row["steady_round_s"] else None
                )
                last_sigmax = _wall_parts(row)
                elapsed = time.perf_counter() - t_start
                guess = _estimate(last_stock, n)
                if args.no_stock:
                    pass
                elif elapsed + guess > args.budget:
                    row["stock"] = {"skipped": f"skipped: budget (est. {guess:.0f} s)"}
                    res["notes"].append(
                        f"stock app at {n} instances skipped: estimated {guess:.0f} s would "
                        f"exceed the {args.budget:.0f} s budget after {elapsed:.0f} s."
                    )
                else:
                    try:
                        left = args.budget - (time.perf_counter() - t_start)
                        stock = simulate_stock(
                            n, overrides, work / f"stock-{n}", timeout=max(120.0, left)
                        )
                        row["stock"] = stock
                        if stock["steady_round_s"] and row["steady_round_s"]:
                            row["steady_over_stock"] = (
                                row["steady_round_s"] / stock["steady_round_s"]
                            )
                        last_stock = _wall_parts(stock)
                    except Exception as err:
                        row["stock"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                        print(f"[bench] stock n={n} failed: {row['stock']['error']}", flush=True)
            except Exception as err:  # record and go on: a partial bench beats none
                row = {"instances": n, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                print(f"[bench] simulation n={n} failed: {row['error']}", flush=True)
            res["simulation"].append(row)
        if 1000 not in counts:
            res["simulation"].append({"instances": 1000, "skipped": NOT_MEASURED})

    done = [r for r in res["simulation"] if "comm" in r]
    res["communication"] = wire_bytes()
    if done:
        ref = max(done, key=lambda r: r["instances"] if r["instances"] <= 10 else 0)
        res["communication"].update(ref["comm"])
        res["communication"]["from_run_instances"] = ref["instances"]
    res["notes"] += [
        'Simulation uses `data-sources = "synthetic:N"` (daily bars 2016-2019), default '
        "federation resources (Flower's default: one simulated SuperNode per "
        "`num-supernodes`, Ray backend defaults), feature cache warm on disk.",
        "At 100 instances `fraction-evaluate = 0.1` (10 evaluate messages per round); "
        "`fraction-train = 1.0` throughout.",
        "Stock = `bench/stock_app`: a quickstart-style Message-API app with Flower's own "
        "`FedAvg.start`, the same MLP, the same synthetic instances and `task.train` loop, "
        "torch threads left at default (as the quickstart does); its round seconds are the "
        "gaps between `evaluate_fn` calls (after each round's evaluate phase), the same span "
        "as sigmax-fl's history `seconds`.",
        "Aggregation at 15k parameters uses the real model's layer shapes; at 1M and 10M four "
        "weight matrices plus small biases. Replies = global + N(0, 0.01) noise, all accepted "
        "by screening. Stock replies carry no sigmax meta record (stock ignores it).",
        "All timings are wall-clock on a shared 2-core machine: other engineers' tests ran "
        "concurrently (see load average), so single rounds and repetitions can be outliers; "
        "every repetition is in results.json.",
        "Communication bytes from history are ArrayRecord.count_bytes (npy payload); the "
        "serialised sizes are protobuf `ByteSize()` of a Message (no gRPC framing).",
    ]
    res["load_end"] = loadavg()
    res["wall_s"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (args.out / "results.md").write_text(markdown(res))
    print(f"[bench] wrote {args.out / 'results.json'} and results.md in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
