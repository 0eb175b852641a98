"""Run config -> Settings: pyproject defaults, unknown keys, wrong types, bad values."""

from __future__ import annotations

import tomllib

import pandas as pd
import pytest

from sigmax_fl.dates import parse_date
from sigmax_fl.settings import ConfigError, Settings, parse_duration

from .conftest import ROOT


def pyproject_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_code_defaults() -> None:
    # The two must not drift: README documents one table for both.
    assert Settings.from_run_config(pyproject_config()) == Settings()
    assert set(pyproject_config()) == set(Settings().to_run_config())


def test_original_sigmax_defaults() -> None:
    s = Settings()
    assert (s.num_server_rounds, s.fraction_train, s.fraction_evaluate) == (10, 1.0, 1.0)
    assert (s.min_train_nodes, s.min_available_nodes, s.local_epochs) == (2, 2, 5)
    assert (s.batch_size, s.learning_rate) == (32, 0.001)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num-server-round": 3}, "unknown run-config key.*num-server-round"),
        ({"local-epochs": "5"}, "'local-epochs' = '5': expected int"),
        ({"learning-rate": True}, "'learning-rate' = True: expected float"),
        ({"batch-size": 0}, "'batch-size' = 0: expected an integer >= 1"),
        ({"fraction-train": 1.5}, "'fraction-train' = 1.5: expected a fraction"),
        ({"optimizer": "adamw"}, "'optimizer' = 'adamw'"),
        ({"max-gap": "soon"}, "'max-gap' = 'soon'"),
        ({"train-end": "2019-06-01"}, "'val-end'.*after train-end"),
        ({"train-end": "not a date"}, "'train-end' = 'not a date': expected a date"),
        ({"train-end": ""}, "'train-end' = '': expected a date"),
        ({"data-policy": "lenient"}, "'data-policy' = 'lenient'"),
    ],
)
def test_bad_values_name_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_run_config(config)


def test_int_accepted_for_float_keys() -> None:
    assert Settings.from_run_config({"learning-rate": 1}).learning_rate == 1.0


def test_durations() -> None:
    assert parse_duration("3d").total_seconds() == 3 * 86400
    assert parse_duration("90min").total_seconds() == 5400
    for bad in ("", "3", "-1d", "0h", "3 weeks"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize(
    "text",
    ["2018-09-30", "20180930", "2018-09-30T12:30", "2018-09-30 12:30:00.25+02:00",
     "2018-09-30T12:30Z", "2018/09/30", "Sep 30 2018", "2018-09", "  2018-09-30",
     "2018-09-30Z", "2018-W39-7", "2018-09-31", "2018-09-30T24:00", "nat", "soon",
     "\u0662\u0660\u0661\u0668-\u0660\u0669-\u0663\u0660"],
)  # fmt: skip
def test_dates_read_as_pandas_reads_them(text: str) -> None:
    # ISO dates without pandas (no import); anything else still goes to pandas: same verdicts
    try:
        expected = pd.Timestamp(text)
    except ValueError:
        expected = pd.NaT
    if expected is pd.NaT:
        with pytest.raises(ValueError):
            parse_date(text)
    else:
        assert parse_date(text) == expected.to_pydatetime()


def test_split_dates_in_any_format_pandas_reads() -> None:
    dates = {"train-end": "2018/09/30", "val-end": "Mar 31 2019"}
    assert Settings.from_run_config(dates).val_end == "Mar 31 2019"
    swapped = {"train-end": dates["val-end"], "val-end": dates["train-end"]}
    with pytest.raises(ConfigError, match="after train-end"):
        Settings.from_run_config(swapped)
