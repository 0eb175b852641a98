"""report: plots and report.md from a hand-written run history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sigmax_fl import cli, report

PNG = b"\x89PNG\r\n\x1a\n"


def _instance(train_loss: float, val_loss: float, ic: float, accepted: bool = True) -> dict:
    train = {"train_loss": train_loss, "num-examples": 100, "accepted": accepted, "bytes": 60_000}
    if not accepted:
        train["reason"] = "update norm 9.1 above the round's bound 3.0 | " + "x" * 400
    evaluate = {"val_loss": val_loss, "hit_rate": 0.52, "ic": ic, "rank_ic": ic / 2}
    return {"node_id": 1, "train": train, "evaluate": {**evaluate, "accepted": True}}


def _history() -> list[dict]:
    rounds = []
    for r in range(1, 5):
        skipped = r == 3
        rounds.append(
            {
                "round": r,
                "seconds": 1.5 + r,
                "skipped": skipped,
                "bytes_sent": 120_000,
                "train": {}
                if skipped
                else {
                    "train_loss": 1.0 / r,
                    "replies-ok": 2,
                    "replies-rejected": 0,
                    "bytes-received": 120_000,
                },
                "evaluate": {"val_loss": 0.9 + 0.01 * r, "ic": 0.01 * r, "rank_ic": 0.02},
                "instances": {
                    "venue-a": _instance(1.0 / r, 0.9, 0.02 * r, accepted=not skipped),
                    "venue-b": _instance(1.2 / r, 1.0, -0.01 * r),
                },
            }
        )
    return rounds


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    with (tmp_path / "history.jsonl").open("w") as handle:
        for record in _history():
            handle.write(json.dumps(record) + "\n")
    return tmp_path


def test_report_draws_plots_and_lists_every_round(run_dir: Path) -> None:
    # Execute: through the console script's entry point
    assert cli.main(["report", str(run_dir)]) == 0

    # Assert
    for name in ("losses.png", "ic.png", "bytes.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000, name
        assert f"]({name})" in (run_dir / "report.md").read_text()
    text = (run_dir / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    for r in range(1, 5):
        assert any(line.startswith(f"| {r} |") for line in table), r
    assert "| 3 | 4.5 | yes |" in text  # the skipped round is marked
    assert "venue-a" in text and "venue-b" in text
    assert "Lowest validation loss so far: round 1" in text  # no summary.json yet
    reason_line = next(line for line in text.splitlines() if "update norm 9.1" in line)
    assert len(reason_line) < 250 and reason_line.count("|") == 5  # cut, pipes escaped


def test_report_reads_history_json_and_summary_without_bytes(tmp_path: Path) -> None:
    history = _history()
    for record in history:
        record.pop("bytes_sent")
        record["train"].pop("bytes-received", None)
    (tmp_path / "history.json").write_text(json.dumps(history))
    (tmp_path / "summary.json").write_text(
        json.dumps(
            {
                "best_round": 2,
                "best_metric": "val_loss",
                "best_value": 0.92,
                "final_model_round": 2,
                "rounds_run": 4,
                "stopped_early": True,
            }
        )
    )

    text = report.report(tmp_path).read_text()

    assert "Best round: 2 by val_loss = 0.92" in text and "stopped early" in text
    assert not (tmp_path / "bytes.png").exists() and "bytes.png" not in text


def test_a_folder_without_history_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"history\.jsonl or history\.json"):
        report.report(tmp_path)
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


def test_a_risk_models_report_shows_its_own_metrics(tmp_path: Path) -> None:
    # A volatility run reports QLIKE and vol correlation, not hit rate or IC
    history = _history()
    for record in history:
        record["evaluate"] = {"val_loss": 0.5, "qlike": 0.31, "vol_corr": 0.42}
        for entry in record["instances"].values():
            entry["evaluate"] = {"val_loss": 0.5, "qlike": 0.29, "vol_corr": 0.4}
    (tmp_path / "history.json").write_text(json.dumps(history))

    report.report(tmp_path)

    markdown = (tmp_path / "report.md").read_text()
    assert "QLIKE" in markdown and "vol corr" in markdown and "0.42" in markdown
    assert "hit rate" not in markdown and "IC |" not in markdown
    assert (tmp_path / "ic.png").read_bytes().startswith(PNG)


def test_the_run_config_names_the_target_when_no_metric_was_shared(run_dir: Path) -> None:
    # share-instance-metrics = false: a risk run's history holds losses only
    (run_dir / "run_config.json").write_text(json.dumps({"target": "volatility"}))

    markdown = report.report(run_dir).read_text()

    assert "QLIKE" in markdown and "hit rate" not in markdown


def test_report_of_a_run_that_trained_nothing_says_so(tmp_path: Path) -> None:
    # Prepare: every round skipped, and no summary.json (such a run fails at its end)
    history = [{**r, "skipped": True, "train": {}} for r in _history()]
    (tmp_path / "history.json").write_text(json.dumps(history))

    # Execute
    assert cli.main(["report", str(tmp_path)]) == 0

    # Assert: no round is offered as the best one
    text = (tmp_path / "report.md").read_text()
    assert "every round so far was skipped: nothing trained" in text
    assert "Lowest validation loss so far" not in text
