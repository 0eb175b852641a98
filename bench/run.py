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
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.timing import timeit

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = Path(__file__).resolve().parent
NOT_MEASURED = "not measured this session"
PARTS = ("aggregation", "data", "simulation")
"""What ``--parts`` may select; ``make bench`` runs all of them."""


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


def med(values: list[float]) -> float:
    """Median as a float."""
    return float(statistics.median(values))


# --------------------------------------------------------------------------- 1. aggregation


def aggregation() -> dict:
    """Aggregation speed and update compression: ``bench/aggregation.py`` measures them.

    ``WeightedFedAvg.aggregate_train`` against stock Flower and the memory-bandwidth floor
    (1M and 10M parameters, 10 replies), bytes per reply per ``update-encoding``, and the test
    R^2 each encoding keeps.
    """
    from bench import aggregation as measure

    speed = measure.aggregation_speed((1_000_000, 10_000_000))
    return {
        "copy_bandwidth_gbs": speed["copy_bandwidth_bytes_per_s"] / 1e9,
        "kernel_build_s": speed["kernel_build_s"],
        "aggregation": speed["rows"],
        "update_bytes": measure.update_bytes(),
        "compression_accuracy": measure.compression_accuracy(),
    }


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


def round_files(
    instances: int = 100, at_rounds: tuple[int, ...] = (1, 1000), reps: int = 5
) -> dict:
    """What the server writes after each round, early and late in a long run.

    The round's history line (appended, fsynced, chained into the history's digest) and its
    checkpoint (``ServerState.to_checkpoint`` then ``runs.write_checkpoint``, fsynced), for a run of
    ``instances`` instances whose history already holds ``r`` rounds, each round's record the
    size of a real one (about 0.3 KB per instance). Median of ``reps``.
    """
    from sigmax_fl import runs
    from sigmax_fl.server_app import ServerState

    def record(server_round: int) -> dict:
        scores = {k: 0.1 for k in ("val_loss", "hit_rate", "ic", "rank_ic", "sharpe", "mse")}
        per_instance = {
            "node_id": 1234567890,
            "train": {"accepted": True, "train_loss": 0.1, "num-examples": 941, "bytes": 60230,
                      "update_norm": 0.05, "weight": 0.01, "seconds": 0.01},
            "evaluate": {"accepted": True, "num-examples": 200, **scores},
        }  # fmt: skip
        return {
            "round": server_round,
            "seconds": 1.0,
            "instances": {f"synthetic-{i:04d}": per_instance for i in range(instances)},
            "train": {"replies-ok": instances, "bytes-received": 60230 * instances},
            "evaluate": scores,
        }

    model = {k: np.zeros(v, dtype=np.float32) for k, v in (("w1", 6400), ("w2", 8192))}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        for done in at_rounds:
            history = tuple(record(r) for r in range(1, done))
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                digest = runs.chain_digest("", runs.append_history(run_dir, record(done)))
                state = ServerState(round=done, arrays=model, history=(*history, record(done)),
                                    history_digest=digest)  # fmt: skip
                runs.write_checkpoint(run_dir, done, state.to_checkpoint({}), keep=1)
                times.append(time.perf_counter() - start)
            size = (run_dir / runs.CHECKPOINTS / f"round-{done:05d}.pt").stat().st_size
            rows.append({"round": done, "seconds": med(times), "checkpoint_bytes": size})
    line = len(json.dumps(record(1)))
    print(f"[bench] round files ({instances} instances, {line:,} B a round): {rows}", flush=True)
    return {"instances": instances, "history_line_bytes": line, "reps": reps, "rows": rows}


# --------------------------------------------------------------------------- memory sampler


class TreeMemory:
    """Peak summed RSS and PSS of every process started for a run.

    That is this process's descendants and every process carrying ``marker`` in its
    environment (Ray workers may be re-parented), sampled every ``interval`` seconds.

    RSS comes from ``statm`` at every sample. PSS needs ``smaps_rollup``, which walks every
    mapping of a process under its memory-map lock: about 40 ms of CPU for one sample of a
    simulation's processes here, so at every sample it took a sixth of a core from the run it
    measured and stalled its processes' page faults. PSS is read at most every
    ``pss_min_interval`` seconds while the summed RSS rises past the peak of the last PSS
    reading by 1% (PSS <= RSS, and the two rise together as processes start and allocate),
    and otherwise every ``pss_interval`` seconds.
    """

    def __init__(
        self,
        marker: str,
        interval: float = 0.25,
        pss_min_interval: float = 1.0,
        pss_interval: float = 5.0,
    ) -> None:
        self.marker = marker.encode()
        self.interval = interval
        self.pss_min_interval = pss_min_interval
        self.pss_interval = pss_interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.pss_samples = 0
        self._last_pss = -math.inf
        self._rss_at_pss = 0
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
        """Add one sample of the summed RSS, and of the summed PSS when it is due."""
        rss = 0
        pids = self._pids()
        for pid in pids:
            try:
                rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page
            except (OSError, ValueError, IndexError):
                continue
        now = time.monotonic()
        self.peak_rss = max(self.peak_rss, rss)
        since = now - self._last_pss
        if since >= self.pss_interval or (
            since >= self.pss_min_interval and rss > 1.01 * self._rss_at_pss
        ):
            self.peak_pss = max(self.peak_pss, self._pss(pids))
            self.pss_samples += 1
            self._last_pss, self._rss_at_pss = now, self.peak_rss
        self.peak_procs = max(self.peak_procs, len(pids))

    @staticmethod
    def _pss(pids: set[int]) -> int:
        pss = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
            except (OSError, ValueError, IndexError):
                continue
        return pss

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


def engine_pass(nodes: int, in_flight: list[int]) -> list[dict]:
    """Seconds of one pass of Flower's simulation engine over its in-memory state.

    ``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`` calls
    ``get_message_ins(node, limit=1)`` for every node, each scanning every message in the
    state, then sleeps 0.1 s. Timed here on Flower's own ``InMemoryLinkState`` with ``nodes``
    registered nodes and ``k`` messages in flight (delivered, awaiting replies): the cost that
    grows as nodes x messages, and what the ServerApp's window (``sigmax_fl.exchange``) bounds.
    """
    from flwr.app import ConfigRecord, Message, RecordDict

    from bench.inmemory import in_memory_federation

    grid, state, node_ids = in_memory_federation(nodes)
    rows = []
    for k in in_flight:
        content = RecordDict({"config": ConfigRecord({"server-round": 1})})
        ids = grid.push_messages(
            [Message(content, dst_node_id=n, message_type="train") for n in node_ids[:k]]
        )
        start = time.perf_counter()
        for n in node_ids:
            state.get_message_ins(node_id=n, limit=1)
        delivered = time.perf_counter()
        for n in node_ids:
            state.get_message_ins(node_id=n, limit=1)
        scanned = time.perf_counter()
        state.delete_messages(set(ids))
        rows.append(
            {
                "nodes": nodes,
                "in_flight": k,
                "delivering_pass_s": delivered - start,
                "waiting_pass_s": scanned - delivered,
            }
        )
        print(f"[bench] engine pass n={nodes} in flight {k}: {rows[-1]}", flush=True)
    return rows


STARTUP_SCRIPT = """
import json, os, sys, time
actors = int(sys.argv[1])
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
path = os.pathsep.join(sys.path)
ray.init(num_cpus=actors, include_dashboard=False, logging_level="WARNING",
         log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
t2 = time.perf_counter()

@ray.remote(num_cpus=1)
class Actor:
    def ping(self):
        return 0

    def load_app(self):
        start = time.perf_counter()
        import flwr.simulation.ray_transport.ray_actor
        flwr_done = time.perf_counter()
        import torch
        torch_done = time.perf_counter()
        import sigmax_fl.client_app
        return flwr_done - start, torch_done - flwr_done, time.perf_counter() - torch_done

pool = [Actor.remote() for _ in range(actors)]
ray.get([a.ping.remote() for a in pool])
t3 = time.perf_counter()
loads = ray.get([a.load_app.remote() for a in pool])
t4 = time.perf_counter()
ray.shutdown()
print(json.dumps({"import_ray_s": t1 - t0, "ray_init_s": t2 - t1, "actors_ready_s": t3 - t2,
                  "actor_import_flwr_s": max(x[0] for x in loads),
                  "actor_import_torch_s": max(x[1] for x in loads),
                  "actor_import_client_app_s": max(x[2] for x in loads),
                  "imports_in_actors_wall_s": t4 - t3}))
"""


def startup(actors: int, ray_env: dict[str, str], reps: int = 2) -> dict:
    """Where a simulation's first round goes before any training: Ray, actors, imports.

    The same steps Flower's Ray backend takes (``ray.init``, one 1-CPU actor per core), then
    what each actor imports before its first message: Flower's actor module, torch and the
    ClientApp module. ``ray_env`` is set on top of the variables of
    ``flwr_cli.SIMULATION_RAY_ENV``, which are removed first: ``{}`` measures Ray's defaults.
    Best of ``reps`` fresh processes (a shared machine only ever slows them).
    """
    import subprocess

    from sigmax_fl.deploy.flwr_cli import SIMULATION_RAY_ENV

    env = {k: v for k, v in os.environ.items() if k not in SIMULATION_RAY_ENV}
    runs = []
    for _ in range(reps):
        done = subprocess.run(
            [sys.executable, "-c", STARTUP_SCRIPT, str(actors)],
            cwd=ROOT,
            env={**env, **ray_env},
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    print(f"[bench] startup ({actors} actors, Ray env {ray_env}): {best}", flush=True)
    return {"actors": actors, "reps": reps, "ray_env": ray_env, **best, "all": runs}


# --------------------------------------------------------------------------- 4. simulation


def _flwr_run(
    n: int,
    app_dir: Path,
    run_config: dict[str, object],
    work: Path,
    timeout: float,
    federation_config: dict[str, object],
    extra_env: dict[str, str] | None = None,
) -> dict:
    """``flwr run`` of an app on a private simulation SuperLink; all its processes stopped.

    ``extra_env``: variables added to the SuperLink's environment (its runner's Ray settings).
    """
    from sigmax_fl.deploy.flwr_cli import (
        FINISHED_OK,
        SIMULATION_RAY_ENV,
        FlwrHome,
        start_superlink,
    )
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
        for key in SIMULATION_RAY_ENV:  # stock gets Ray's defaults even if the shell set them
            home.env.pop(key, None)
        link = start_superlink(
            supervisor, home, work / "state.db", simulation=True, extra_env=extra_env
        )
        t_link = time.perf_counter()
        home.add_connection("bench", link.address)
        run_id = home.run_app(
            app_dir,
            "bench",
            run_config=run_config,
            federation_config=federation_config,
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
        "federation_config": federation_config,
        "status": status,
        "processes_left": left,
        "superlink_start_s": t_link - t0,
        "run_wall_s": t_run - t_link,
        "total_wall_s": t_stop - t0,
        "stop_s": t_stop - t_run,
        "peak_rss_all_processes_mib": mem.peak_rss / 2**20,
        "peak_pss_all_processes_mib": mem.peak_pss / 2**20,
        "peak_processes": mem.peak_procs,
        "pss_samples": mem.pss_samples,
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
    # Flower's default federation resources and Ray's defaults, as a quickstart user gets them.
    result = _flwr_run(n, OUT_DIR / "stock_app", run_config, work, timeout, {"num-supernodes": n})
    seconds = [float(x) for x in json.loads(out.read_text())["seconds"]]
    return _timings(result, seconds, "stock")


def simulate(
    n: int, overrides: dict[str, object], work: Path, timeout: float, label: str = "sigmax-fl"
) -> dict:
    """The real app via ``flwr run`` on a private simulation SuperLink; all stopped after."""
    work.mkdir(parents=True, exist_ok=True)
    outputs = work / "outputs"
    run_config = {**overrides, "outputs-dir": str(outputs), "run-name": f"bench-{n}"}
    from sigmax_fl.deploy.flwr_cli import SIMULATION_RAY_ENV, simulation_federation_config

    # The app's own runner's settings (`make run`): one 1-CPU Ray actor per core, Ray's idle
    # workers not started in advance.
    federation = simulation_federation_config(n)
    result = _flwr_run(n, ROOT, run_config, work, timeout, federation, dict(SIMULATION_RAY_ENV))
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
                "phase_seconds": r.get("phase_seconds"),
                "bytes_sent": r["bytes_sent"],
                "bytes_received": r["train"].get("bytes-received"),
                "train_replies": n_train,
                "evaluate_replies": n_eval,
                "up_bytes_per_instance_median": int(statistics.median(up)) if up else None,
            }
        )
    last = per_round[-1]
    # bytes_sent = model bytes x (train messages + evaluate messages); the last round has both
    per_msg = last["bytes_sent"] / (last["train_replies"] + last["evaluate_replies"])
    down_train = per_msg
    # One exchange a round sends the model once; two, twice
    down_total = med([r["bytes_sent"] / n for r in per_round])
    up = last["up_bytes_per_instance_median"]
    result["rounds"] = per_round
    phases = [r["phase_seconds"] for r in history[1:] if r.get("phase_seconds")]
    if phases:
        result["steady_phase_s"] = {k: med([p[k] for p in phases]) for k in phases[0]}
    result["comm"] = {
        "down_bytes_per_train_message": down_train,
        "down_bytes_per_instance_per_round": down_total,
        "up_bytes_per_instance_per_round": up,
    }
    _timings(result, seconds, label)
    return result


OTHER_WAY_UP_TO = 100
"""Instances up to which the app also runs with ``evaluate-on-receipt`` the other way."""


def one_exchange(overrides: dict[str, object]) -> bool:
    """What ``evaluate-on-receipt`` resolves to for these overrides (``auto`` by default)."""
    from sigmax_fl.settings import Settings

    return bool(Settings.from_run_config(overrides).evaluate_on_receipt)


def _other_way(n: int, overrides: dict[str, object], work: Path, left: float) -> dict:
    """The app again with ``evaluate-on-receipt`` set against what its default resolves to."""
    fused = not one_exchange(overrides)
    label = "one exchange" if fused else "two exchanges"
    try:
        result = simulate(
            n,
            {**overrides, "evaluate-on-receipt": fused},
            work / f"sim-{n}-other-way",
            timeout=max(120.0, left),
            label=f"sigmax-fl {label}",
        )
    except Exception as err:  # recorded like any failed run
        print(f"[bench] {label} n={n} failed: {err}", flush=True)
        result = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return {**result, "evaluate_on_receipt": fused}


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
    """Issue 7's targets against this run's numbers, with where the time went."""
    sims = {r["instances"]: r for r in res["simulation"] if "round_seconds" in r}
    rows: list[tuple[str, str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "not met")

    def phases(row: dict) -> str:
        p = row.get("steady_phase_s")
        return (
            f"train phase {_fmt(p['train'])} s, evaluate phase {_fmt(p['evaluate'])} s" if p else ""
        )

    r100 = sims.get(100)
    x = r100["steady_round_s"] / r100["floor"]["train_s"] if r100 else None
    other = r100.get("other_way", {}) if r100 else {}
    y = other["steady_round_s"] / r100["floor"]["train_s"] if other.get("steady_round_s") else None
    why = (
        f"default: {phases(r100)} for a floor of {_fmt(r100['floor']['train_s'])} s; each phase "
        "waits up to one 0.1 s pass of Flower's engine before its messages are handed out"
        if r100
        else ""
    )
    rows.append(
        ("steady round at 100 instances <= 1.5x floor",
         f"{x:.2f}x ({_exchanges(r100)})"
         + (f"; {y:.2f}x with {_exchanges(other)}" if y else "") if x else "-",
         verdict(None if x is None else x <= 1.5)
         + (f"; {_exchanges(other)}: {verdict(y <= 1.5)}" if y else ""), why)
    )  # fmt: skip
    r10 = sims.get(10)
    x = r10.get("steady_over_stock") if r10 else None
    other = r10.get("other_way", {}) if r10 else {}
    y = other.get("steady_over_stock")
    why = (
        f"default ({_exchanges(r10)}): {phases(r10)}. Flower's engine hands each node at most "
        "one message per pass and sleeps 0.1 s between passes "
        "(`vce_api.add_messages_to_queue`), so a round of two exchanges (train, then evaluate "
        "the new model), as stock's, waits for two passes and one exchange for one"
        if r10
        else ""
    )
    rows.append(
        ("steady round at 10 instances <= 0.6x stock",
         f"{x:.2f}x ({_exchanges(r10)})" + (f"; {y:.2f}x with {_exchanges(other)}" if y else "")
         if x else "-",
         verdict(None if x is None else x <= 0.6)
         + (f"; {_exchanges(other)}: {verdict(y <= 0.6)}" if y else ""), why)
    )  # fmt: skip
    # At 1,000 instances one round's own training is longer than the target: its start-up
    # overhead (first round minus a steady one) is in the per-round list below.
    firsts = [r["first_round_s"] for n, r in sims.items() if n <= 100]
    x = max(firsts) if firsts else None
    st = res.get("startup")
    why = (
        f"before any training: ray.init {_fmt(st['ray_init_s'])} s, {st['actors']} actors "
        f"ready {_fmt(st['actors_ready_s'])} s, then in each actor import Flower's actor "
        f"{_fmt(st['actor_import_flwr_s'])} s, torch "
        f"{_fmt(st['actor_import_torch_s'])} s and the ClientApp "
        f"{_fmt(st['actor_import_client_app_s'])} s (best of {st['reps']})"
        if st
        else ""
    )
    spans = [
        f"{r['first_round_s'] - r['steady_round_s']:.1f} s at {n}"
        for n, r in sims.items()
        if n <= 100 and r.get("steady_round_s")
    ]
    if spans:
        why += "; first round minus a steady one: " + ", ".join(spans) + " instances"
    stock_firsts = [
        f"{r['stock']['first_round_s']:.1f} s at {n}"
        for n, r in sims.items()
        if n <= 100 and "first_round_s" in r.get("stock", {})
    ]
    if stock_firsts:
        why += "; stock's first round: " + ", ".join(stock_firsts) + " instances"
    rows.append(
        ("first round <= 6 s (worst run up to 100 instances)", f"{x:.1f} s" if x else "-",
         verdict(None if x is None else x <= 6.0), why)
    )  # fmt: skip
    r1000 = sims.get(1000)
    passes = {p["in_flight"]: p["waiting_pass_s"] for p in res.get("engine_pass", [])}
    if r1000:
        wall, peak = r1000["run_wall_s"], r1000["peak_rss_all_processes_mib"] / 1024
        why = (
            f"{phases(r1000)} for a floor of {_fmt(r1000['floor']['train_s'])} s; one engine "
            "pass over 1,000 nodes costs "
            + ", ".join(f"{_fmt(v)} s with {k} messages in flight" for k, v in passes.items())
        )
        rows.append(
            ("1,000 instances, 5 rounds < 10 min, < 4 GB", f"{wall:.0f} s, {peak:.1f} GiB",
             verdict(wall < 600 and peak < 4), why)
        )  # fmt: skip
    else:
        rows.append(("1,000 instances, 5 rounds < 10 min, < 4 GB", "-", NOT_MEASURED, ""))
    for a in res.get("aggregation", []):
        x = a["ours_x_floor"]
        why = (
            f"screening {_fmt(a['screening_s'])} s, one pass "
            f"({'C kernel' if a['fused_kernel'] else 'torch'}) {_fmt(a['one_pass_s'])} s, "
            f"result record {_fmt(a['result_record_s'])} s"
            + (f", the rest {_fmt(a['rest_s'])} s" if "rest_s" in a else "")
            + f"; reading the replies alone {_fmt(a['read_replies_only_s'])} s"
        )
        rows.append(
            (f"WeightedFedAvg at {a['params']:,} params <= 1.5x floor", f"{x:.2f}x",
             verdict(x <= 1.5), why)
        )  # fmt: skip
    if sizes := res.get("update_bytes"):
        accuracy = res["compression_accuracy"]
        for encoding, bound in (("float16", 0.55), ("int8", 0.3)):
            x = sizes[encoding]["arrayrecord_bytes_x_float32"]
            r2 = accuracy[encoding]["r2_x_float32"]
            # A ratio of R^2 only means "kept" when the float32 run learned something (R^2 > 0)
            learned = accuracy["float32"]["test_r2"] > 0
            rows.append(
                (f"{encoding} update bytes <= {bound}x float32, test R^2 >= 0.99x float32",
                 f"{x:.3f}x bytes, {r2:.4f}x R^2",
                 verdict(x <= bound and r2 >= 0.99 and learned),
                 "" if learned else "float32 test R^2 <= 0: the ratio says nothing")
            )  # fmt: skip
    out = ["", "## Issue 7 targets against this run", ""]
    out += ["| target | measured | verdict | where the time goes |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
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
    ]
    if res["parts"] != list(PARTS):
        lines += ["", f"Partial run: only {', '.join(res['parts'])}."]
    if "aggregation" in res:
        lines += _aggregation_md(res)
    if "data" in res:
        lines += _data_md(res["data"])
    if "round_files" in res:
        lines += _round_files_md(res["round_files"])
    lines += _simulation_md(res)
    return "\n".join(lines) + "\n"


def _aggregation_md(res: dict) -> list[str]:
    lines = [
        "",
        "## Aggregation (10 good replies, float32; median seconds, minimum in brackets)",
        "",
        f"Copy bandwidth (best `np.copyto`, read+write): {res['copy_bandwidth_gbs']:.2f} GB/s. "
        "Floor = (10 replies read + 1 result written) x P x 4 bytes / copy bandwidth. "
        "`bench/aggregation.py` measures it; parts of WeightedFedAvg's time: screening, the "
        "one pass (norms and weighted sum, written into the result's npy bytes; in the C kernel "
        "of `sigmax_fl/fused.py` where it was built), making the result's record (fresh bytes, "
        "Flower Arrays), and the rest of `aggregate_train` (its median less those of the "
        "parts: sorting, shares, metrics); screening includes reading the sent model's "
        "layout. Reading the replies alone (torch sums) is a limit of this machine. "
        + (
            "The one pass ran in the C kernel"
            + (
                f", built in {res['kernel_build_s']:.2f} s once per server process."
                if res.get("kernel_build_s")
                else " (its build time was not recorded in this run)."
            )
            if any(r["fused_kernel"] for r in res["aggregation"])
            else "The kernel was not built here: the torch pass ran."
        ),
        "",
        "| parameters | floor s | WeightedFedAvg s | x floor | stock FedAvg s | x floor | "
        "screening s | one pass s | record s | rest s | read only s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["aggregation"]:
        lines.append(
            f"| {r['params']:,} | {_fmt(r['floor_s'])} | {_fmt(r['ours_s'])} "
            f"({_fmt(r['ours_min_s'])}) | {r['ours_x_floor']:.2f}x | {_fmt(r['stock_s'])} "
            f"({_fmt(r['stock_min_s'])}) | {r['stock_x_floor']:.2f}x | "
            f"{_fmt(r['screening_s'])} | {_fmt(r['one_pass_s'])}"
            f"{' (C)' if r['fused_kernel'] else ''} | {_fmt(r['result_record_s'])} | "
            f"{_fmt(r['rest_s']) if 'rest_s' in r else '-'} | {_fmt(r['read_replies_only_s'])} |"
        )
    sizes, accuracy = res["update_bytes"], res["compression_accuracy"]
    lines += [
        "",
        "## Update compression (`update-encoding`)",
        "",
        f"Bytes of one train reply of the real model; test R^2 of the app trained with each "
        f"encoding on {accuracy['instances']} synthetic instances with a planted signal "
        f"({accuracy['rounds']} rounds).",
        "",
        "| encoding | bytes per update | x float32 | reply message bytes | x float32 | test R^2 "
        "| x float32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for encoding in ("float32", "float16", "int8"):
        b, a = sizes[encoding], accuracy[encoding]
        lines.append(
            f"| {encoding} | {b['arrayrecord_bytes']:,} | {b['arrayrecord_bytes_x_float32']:.3f} "
            f"| {b['reply_proto_bytes']:,} | {b['reply_proto_bytes_x_float32']:.3f} | "
            f"{a['test_r2']:.4f} | {a.get('r2_x_float32', 1.0):.4f} |"
        )
    return lines


def _data_md(d: dict) -> list[str]:
    return [
        "",
        "## Data",
        "",
        f"| file | bars | feature rows | load s | featurise s | total s (median of {d['reps']}) |",
        "|---|---|---|---|---|---|",
        f"| {d['file']} | {d['bars']:,} | {d['feature_rows']:,} | {_fmt(d['load_s'])} | "
        f"{_fmt(d['featurise_s'])} | {_fmt(d['total_s'])} |",
    ]


def _round_files_md(f: dict) -> list[str]:
    return [
        "",
        "## The server's files after each round",
        "",
        f"{f['instances']} instances, a history line of {f['history_line_bytes']:,} bytes a "
        "round: the line appended to `history.jsonl` (fsynced, chained into the history's "
        "digest) and the round's checkpoint (fsynced, renamed, folder fsynced), which names "
        "the history's lines by number and digest instead of holding them (median of "
        f"{f['reps']}).",
        "",
        "| after round | seconds | checkpoint bytes |",
        "|---|---|---|",
        *(
            f"| {r['round']:,} | {_fmt(r['seconds'])} | {r['checkpoint_bytes']:,} |"
            for r in f["rows"]
        ),
    ]


def _simulation_md(res: dict) -> list[str]:
    if not any("round_seconds" in r for r in res["simulation"]):
        return _targets(res) + ["", "Notes:", ""] + [f"- {note}" for note in res["notes"]]
    c = res["communication"]
    lines = [
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
            "down per instance per round (history bytes_sent / n, median of rounds)",
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
        "process started for the run: RSS sampled every 0.25 s, PSS (which costs the run CPU "
        "to read) at most every second while RSS rises and otherwise every 5 s.",
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
    lines += _other_way_md(res)
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
    lines += _startup_md(res)
    lines += _targets(res)
    lines += ["", "Per-round seconds (round 1 first):", ""]
    for row in res["simulation"]:
        if "round_seconds" in row:
            stock = row.get("stock", {}).get("round_seconds")
            other = row.get("other_way", {})
            lines.append(
                f"- {row['instances']} instances: sigmax-fl ({_exchanges(row)}) "
                f"{row['round_seconds']}"
                + (
                    f"; {_exchanges(other)} {other['round_seconds']}"
                    if "round_seconds" in other
                    else ""
                )
                + (f"; stock {stock}" if stock else "")
            )
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in res["notes"]]
    return lines


def _exchanges(row: dict) -> str:
    """How a run's rounds went: ``evaluate-on-receipt`` as it resolved."""
    return "one exchange a round" if row.get("evaluate_on_receipt") else "two exchanges a round"


def _other_way_md(res: dict) -> list[str]:
    rows = [r for r in res["simulation"] if "other_way" in r]
    if not rows:
        return []
    lines = [
        "",
        "### sigmax-fl with `evaluate-on-receipt` the other way, same runs",
        "",
        '`evaluate-on-receipt = "auto"` (the default) makes a round one exchange where that '
        "gives the same scores and model while every instance trains: `fraction-train` and "
        "`fraction-evaluate` both 1, as at "
        "3 and 10 instances here. Each instance then scores the model it receives before "
        "training on it, so a round waits for one pass of Flower's engine instead of two. At "
        "100 instances `fraction-evaluate` is 0.1, so the default is two exchanges; with one, "
        "all 100 instances score each round instead of a sample of 10. These runs set the key "
        "against its default.",
        "",
        "| instances | rounds are | run wall s | first round s | steady round s | "
        "steady / floor | steady / stock steady | train phase s (steady) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        o = row["other_way"]
        if "error" in o:
            lines.append(f"| {row['instances']:,} | {o['error']} |  |  |  |  |  |  |  |")
            continue
        ratio = o["steady_round_s"] / row["floor"]["train_s"] if o.get("steady_round_s") else None
        lines.append(
            f"| {row['instances']:,} | {_exchanges(o)} | {o['run_wall_s']:.1f} | "
            f"{o['first_round_s']:.2f} | "
            f"{_fmt(o['steady_round_s'])} | {(f'{ratio:.1f}x' if ratio else '-')} | "
            f"{_fmt(o.get('steady_over_stock'))} | "
            f"{_fmt(o.get('steady_phase_s', {}).get('train'))} | "
            f"{o['peak_rss_all_processes_mib']:.0f} |"
        )
    return lines


def _startup_md(res: dict) -> list[str]:
    lines = []
    measured = [
        (label, st)
        for label, st in (
            ("sigmax-fl's runner (`SIMULATION_RAY_ENV`)", res.get("startup")),
            ("Ray's defaults (stock)", res.get("startup_ray_defaults")),
        )
        if st
    ]
    if measured:
        lines += [
            "",
            "### Before the first message: Ray and the actors (outside the app, best of "
            f"{measured[0][1]['reps']})",
            "",
            "`SIMULATION_RAY_ENV` (`sigmax_fl/deploy/flwr_cli.py`) keeps Ray from starting idle "
            "workers in advance, which Flower's actors do not use.",
            "",
            "| Ray environment | import ray | ray.init | actors ready | per actor: import "
            "Flower's actor | import torch | import the ClientApp (given torch and flwr) | "
            "imports, all actors, wall |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {label} | {_fmt(st['import_ray_s'])} | {_fmt(st['ray_init_s'])} | "
            f"{_fmt(st['actors_ready_s'])} | {_fmt(st['actor_import_flwr_s'])} | "
            f"{_fmt(st['actor_import_torch_s'])} | "
            f"{_fmt(st['actor_import_client_app_s'])} | {_fmt(st['imports_in_actors_wall_s'])} |"
            for label, st in measured
        ]
    if passes := res.get("engine_pass"):
        lines += [
            "",
            "### One pass of Flower's simulation engine over 1,000 nodes",
            "",
            "`add_messages_to_queue` asks the in-memory state for every node's next message "
            "(each call scans every message in flight) and then sleeps 0.1 s. sigmax-fl keeps "
            "at most `exchange.PASS_BUDGET / nodes` messages in flight in simulation.",
            "",
            "| messages in flight | pass that delivers them, s | pass while they train, s |",
            "|---|---|---|",
        ]
        lines += [
            f"| {p['in_flight']:,} | {_fmt(p['delivering_pass_s'])} | {_fmt(p['waiting_pass_s'])} |"
            for p in passes
        ]
    return lines


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
        default=1200.0,
        help="seconds; a larger simulation is skipped if it would likely not fit (the "
        "1,000-instance run needs about 400 s on a machine where 100 instances' training "
        "floor is 2.7 s a round)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--no-stock", action="store_true", help="skip the stock Flower app")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (development runs)",
    )
    args = parser.parse_args(argv)
    parts = {x for x in args.parts.split(",") if x}
    if parts - set(PARTS):
        parser.error(f"--parts: unknown {sorted(parts - set(PARTS))}; expected {PARTS}")

    t_start = time.perf_counter()
    res: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": machine(),
        "load_start": loadavg(),
        "notes": [],
    }
    print(f"[bench] machine {res['machine']}, load {res['load_start']}", flush=True)

    res["parts"] = [x for x in PARTS if x in parts]
    if "aggregation" in parts:
        res.update(aggregation())
        gc.collect()
    if "data" in parts:
        res["data"] = data_load()
        res["round_files"] = round_files()

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
        counts = [int(x) for x in args.instances.split(",") if x] if "simulation" in parts else []
        for n in counts:
            overrides = {
                **sim_settings,
                "data-sources": f"synthetic:{n}",
                "min-available-nodes": n,
            }
            if n >= 100:
                overrides["fraction-evaluate"] = 0.1
            elapsed = time.perf_counter() - t_start
            # The app runs twice up to OTHER_WAY_UP_TO instances (one and two exchanges)
            guess = _estimate(last_sigmax, n) * (2 if n <= OTHER_WAY_UP_TO else 1)
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
                row["evaluate_on_receipt"] = one_exchange(overrides)
                row["floor"] = floor
                row["steady_over_floor"] = (
                    row["steady_round_s"] / floor["train_s"] if row["steady_round_s"] else None
                )
                last_sigmax = _wall_parts(row)
                if n <= OTHER_WAY_UP_TO:
                    left = args.budget - (time.perf_counter() - t_start)
                    row["other_way"] = _other_way(n, overrides, work, left)
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
                        for ours in (row, row.get("other_way", {})):
                            if stock["steady_round_s"] and ours.get("steady_round_s"):
                                ours["steady_over_stock"] = (
                                    ours["steady_round_s"] / stock["steady_round_s"]
                                )
                        last_stock = _wall_parts(stock)
                    except subprocess.TimeoutExpired as err:
                        row["stock"] = {
                            "error": f"did not finish within the bench's remaining "
                            f"{err.timeout:.0f} s (bench --budget {args.budget:.0f} s)"
                        }
                        print(f"[bench] stock n={n}: {row['stock']['error']}", flush=True)
                    except Exception as err:
                        row["stock"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                        print(f"[bench] stock n={n} failed: {row['stock']['error']}", flush=True)
            except Exception as err:  # record and go on: a partial bench beats none
                row = {"instances": n, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                print(f"[bench] simulation n={n} failed: {row['error']}", flush=True)
            res["simulation"].append(row)
        if counts:
            # Where the first round and a large round go (see the sections of results.md).
            from sigmax_fl.deploy.flwr_cli import SIMULATION_RAY_ENV

            cores = len(os.sched_getaffinity(0))
            res["startup"] = startup(cores, dict(SIMULATION_RAY_ENV))
            res["startup_ray_defaults"] = startup(cores, {})
            from sigmax_fl.exchange import MIN_IN_FLIGHT, PASS_BUDGET

            window = max(PASS_BUDGET // 1000, MIN_IN_FLIGHT)
            res["engine_pass"] = engine_pass(1000, [1000, window])
        if 1000 not in counts:
            res["simulation"].append({"instances": 1000, "skipped": NOT_MEASURED})

    done = [r for r in res["simulation"] if "comm" in r]
    res["communication"] = wire_bytes()
    if done:
        ref = max(done, key=lambda r: r["instances"] if r["instances"] <= 10 else 0)
        res["communication"].update(ref["comm"])
        res["communication"]["from_run_instances"] = ref["instances"]
    res["notes"] += [
        'Simulation uses `data-sources = "synthetic:N"` (daily bars 2016-2019), one simulated '
        "SuperNode per instance, feature cache warm on disk. sigmax-fl runs with the federation "
        "config of its own runner (`make run`, `sigmax_fl.deploy.flwr_cli."
        "simulation_federation_config`): `client-resources-num-cpus = 1`, "
        "`init-args-num-cpus` = cores, i.e. one 1-CPU Ray actor per core, and its Ray "
        "environment (`SIMULATION_RAY_ENV`: `RAY_prestart_worker_first_driver=0`); the stock "
        "app with Flower's and Ray's defaults (2 CPUs per ClientApp: one actor on this "
        "machine), as a quickstart user gets it.",
        "At 100 and 1,000 instances `fraction-evaluate = 0.1` (a tenth evaluate each round); "
        "`fraction-train = 1.0` throughout.",
        "Stock = `bench/stock_app`: a quickstart-style Message-API app with Flower's own "
        "`FedAvg.start`, the same MLP and synthetic instances, the quickstart's training loop "
        "(`torch.optim.Adam`, same batch size, learning rate and epochs) and torch threads left "
        "at default (as the quickstart does); its round seconds are the "
        "gaps between `evaluate_fn` calls (after each round's evaluate phase), the span of "
        "sigmax-fl's history `seconds` plus sigmax-fl's per-round checkpoint, history and "
        "audit writes, which come after its record (2-4 ms a round at 10 and 100 instances, "
        "timed in process), so sigmax-fl's round figures leave those out.",
        "Aggregation replies (bench/aggregation.py) are the global model plus small noise, all "
        "accepted by screening; stock is Flower's `aggregate_arrayrecords` on the same replies.",
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
