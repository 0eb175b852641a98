"""A ClientApp process whose instance's features are cached trains without importing pandas.

A deployed SuperNode runs every message in a fresh ClientApp process, and each simulated actor
imports the ClientApp before its first message: pandas there cost about 0.2 s each time
(:mod:`sigmax_fl.dates`). These run the real ClientApp in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DEFAULT_INSTANCES, ROOT

# One train and one evaluate message through the ClientApp's own handlers, then report.
CHILD = """
import json, sys, time
from flwr.app import ArrayRecord, ConfigRecord, Context, Metadata, RecordDict
from flwr.app.message import make_message
from sigmax_fl import client_app
from sigmax_fl.model import build_model

run_config = json.loads(sys.argv[1])
context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 1},
                  state=RecordDict(), run_config=run_config)
imported_with_app = "pandas" in sys.modules
out = {}
for kind in ("train", "evaluate"):
    content = RecordDict({"arrays": ArrayRecord(build_model("trading-mlp", seed=1).state_dict()),
                          "config": ConfigRecord({"server-round": 1})})
    message = make_message(Metadata(1, kind, 0, 5, "", "1", time.time(), 600.0, kind), content)
    reply = getattr(client_app, kind)(message, context)
    out[kind] = sorted(reply.content.metric_records["metrics"].keys())
print(json.dumps({"pandas_with_app": imported_with_app, "pandas": "pandas" in sys.modules, **out}))
"""


def _client(run_config: dict, cache: Path) -> dict:
    env = {**os.environ, "SIGMAX_FL_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(run_config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("source", [DEFAULT_INSTANCES[0], "synthetic:1"])
def test_a_cached_instance_trains_and_scores_without_pandas(source: str, tmp_path: Path) -> None:
    run_config = {"data-sources": source, "local-epochs": 1}
    # The instance's first process builds and caches its features, which needs pandas
    cold = _client(run_config, tmp_path)
    assert not cold["pandas_with_app"] and cold["pandas"]
    assert list(tmp_path.glob("*.npz")), "the first process cached no features"

    warm = _client(run_config, tmp_path)
    assert "train_loss" in warm["train"] and "num-examples" in warm["train"]
    assert "hit_rate" in warm["evaluate"]
    assert warm == {**cold, "pandas": False}
