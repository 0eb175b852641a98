"""Run config (kebab-case keys of ``[tool.flwr.app.config]``) -> one typed, validated object.

The config is read once, here; everything downstream gets attributes with units, so a typo in
pyproject.toml or ``--run-config`` is an error naming the key, not a silent default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from sigmax_fl.dates import duration_parts, parse_date
from sigmax_fl.strategy import QUERY_TIMEOUT, Defences, WeightedFedAvg
from sigmax_fl.targets import TARGETS, VALIDATION_METRICS

if TYPE_CHECKING:
    import pandas as pd

OPTIMIZERS = ("adam", "sgd")
STOPPING_METRICS = {
    "val_loss": "min",
    "ic": "max",
    "rank_ic": "max",
    "hit_rate": "max",
    "qlike": "min",
    "vol_corr": "max",
}
"""Aggregated validation metrics early stopping can watch, and which way is better; besides
``val_loss``, the target's own (:data:`sigmax_fl.targets.VALIDATION_METRICS`)."""
DATA_POLICIES = ("strict", "repair")
DP_MODES = ("off", "central", "local")
USE_CASES = ("multi-market", "multi-strategy", "risk")
PERSONALISATION = ("none", "local-head", "fine-tune")
SCALERS = ("local", "federated")
UPDATE_ENCODINGS = ("float32", "float16", "int8")
_USE_CASE_DEFAULTS = {
    "multi-market": {"target": "return", "personalisation": "none"},
    "multi-strategy": {"target": "return", "personalisation": "local-head"},
    "risk": {"target": "volatility", "personalisation": "none"},
}
"""What ``auto`` means for ``target`` and ``personalisation`` under each ``use-case``."""
_USE_CASE_ALLOWS = {
    "multi-market": {"target": ("return",), "personalisation": ("none",)},
    "multi-strategy": {"target": TARGETS, "personalisation": ("local-head", "fine-tune")},
    "risk": {"target": ("volatility",), "personalisation": PERSONALISATION},
}
"""Explicit values a use case accepts: a preset never silently overrides an explicit key."""


def parse_duration(text: str) -> pd.Timedelta:
    """``"3d"``, ``"12h"``, ``"90min"``, ``"30s"`` -> Timedelta; anything else is an error."""
    import pandas as pd

    amount, unit = duration_parts(text)
    return pd.Timedelta(**{unit: amount})


class ConfigError(ValueError):
    """A run-config value that cannot be used, naming the key and what was expected."""


@dataclass(frozen=True)
class Settings:
    """Every run-config key, typed. Field ``num_server_rounds`` is key ``num-server-rounds``."""

    num_server_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 600.0
    evaluate_on_receipt: bool | str = "auto"
    """Each instance scores the model a train message carries (the last round's global model)
    before training on it and sends the scores with its update, so a round is one exchange
    instead of two; the last model is scored by one closing evaluate phase. Each round's scores
    then come from the instances sampled to train, a round later. ``"auto"`` resolves to true
    exactly where that gives the two-phase run's history and model whenever every sampled
    instance's training succeeds (:meth:`one_exchange_equivalent`). It is resolved once, here:
    ``dataclasses.replace`` of another key keeps the resolved value."""
    local_epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 0.001
    optimizer: str = "adam"
    seed: int = 42
    model: str = "trading-mlp"
    initial_model: str = ""
    """A ``torch.save``-d state dict of ``model`` to start from (the Python API's
    ``start_server(initial_model=...)``); empty: initial weights from ``seed``. Read by the
    ServerApp only, so it is not checked here, where a ClientApp on another machine reads
    the same run config."""
    data_sources: str = (
        "coinbase-btc-usd-1d,bitstamp-btc-usd-1d,bitstamp-eth-usd-1d,bitstamp-ltc-usd-1d"
    )
    data_dir: str = ""
    data_policy: str = "strict"
    horizon: int = 1
    max_gap: str = "3d"
    train_end: str = "2018-09-30"
    val_end: str = "2019-03-31"
    outputs_dir: str = ""
    run_name: str = ""
    keep_checkpoints: int = 3
    resume_from: str = ""
    early_stopping_patience: int = 0
    early_stopping_metric: str = "val_loss"
    wait_for_nodes_timeout: float = 300.0
    min_train_replies: int = 1
    aggregation: str = "weighted-fedavg"
    max_update_norm: float = 0.0
    max_update_norm_ratio: float = 3.0
    update_norm_policy: str = "reject"
    max_examples_per_node: int = 10_000_000
    max_weight_share: float = 0.5
    share_instance_metrics: bool = True
    dp: str = "off"
    dp_clip_norm: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_delta: float = 1e-5
    dp_target_epsilon: float = 0.0
    secure_aggregation: bool = False
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.67
    secagg_clip_norm: float = 2.0
    use_case: str = "multi-market"
    """A preset: ``multi-market`` (one next-bar return model across venues), ``multi-strategy``
    (a shared body, each instance's own head or fine-tuned copy), ``risk`` (a realised-volatility
    model). It resolves ``target`` and ``personalisation`` when they are ``auto``."""
    target: str = "auto"
    personalisation: str = "auto"
    fine_tune_epochs: int = 1
    instance_learning_rates: str = ""
    """``"name=value,..."``: per-instance learning rates by instance id (in simulation the
    instances are the ``data-sources`` entries and a name that is none of them is an error); a
    node's ``learning-rate`` node config does the same. Either overrides ``learning-rate``."""
    grad_accumulation_steps: int = 1
    mixed_precision: bool = False
    scaler: str = "local"
    update_encoding: str = "float32"

    def __post_init__(self) -> None:
        positive = (
            "num_server_rounds",
            "local_epochs",
            "batch_size",
            "horizon",
            "min_available_nodes",
        )
        for name in positive:
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "an integer >= 1")
        if self.min_train_nodes < 0:
            _bad("min_train_nodes", self.min_train_nodes, "an integer >= 0")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _bad(name, getattr(self, name), "a fraction in [0, 1]")
        if not self.learning_rate > 0:
            _bad("learning_rate", self.learning_rate, "a positive number")
        if not self.round_timeout > 0:
            _bad("round_timeout", self.round_timeout, "a positive number of seconds")
        if self.optimizer not in OPTIMIZERS:
            _bad("optimizer", self.optimizer, f"one of {list(OPTIMIZERS)}")
        if self.data_policy not in DATA_POLICIES:
            _bad("data_policy", self.data_policy, f"one of {list(DATA_POLICIES)}")
        try:
            duration_parts(self.max_gap)
        except ValueError:
            _bad("max_gap", self.max_gap, "a positive duration such as '3d', '12h' or '90min'")
        dates = {}
        for name in ("train_end", "val_end"):
            try:
                dates[name] = parse_date(getattr(self, name))
            except ValueError:
                _bad(name, getattr(self, name), "a date such as '2018-09-30'")
        if dates["train_end"] >= dates["val_end"]:
            _bad("val_end", self.val_end, f"a date after train-end ({self.train_end})")
        for name in ("keep_checkpoints", "early_stopping_patience", "min_train_replies"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "an integer >= 0")
        if self.early_stopping_metric not in STOPPING_METRICS:
            _bad(
                "early_stopping_metric",
                self.early_stopping_metric,
                f"one of {sorted(STOPPING_METRICS)}",
            )
        if not self.wait_for_nodes_timeout > 0:
            _bad(
                "wait_for_nodes_timeout",
                self.wait_for_nodes_timeout,
                "a positive number of seconds",
            )
        if self.max_update_norm < 0 or not self.max_update_norm_ratio > 0:
            _bad(
                "max_update_norm",
                self.max_update_norm,
                "a bound >= 0 (0: adaptive) and a ratio > 0",
            )
        if self.max_examples_per_node < 1:
            _bad("max_examples_per_node", self.max_examples_per_node, "an integer >= 1")
        if self.dp not in DP_MODES:
            _bad("dp", self.dp, f"one of {list(DP_MODES)}")
        if not (self.dp_clip_norm > 0 and self.dp_noise_multiplier >= 0 and 0 < self.dp_delta < 1):
            _bad(
                "dp_clip_norm",
                self.dp_clip_norm,
                "dp-clip-norm > 0, dp-noise-multiplier >= 0, 0 < dp-delta < 1",
            )
        if self.dp_target_epsilon < 0:
            _bad("dp_target_epsilon", self.dp_target_epsilon, "an epsilon >= 0 (0: no target)")
        self._resolve_use_case()
        self._check_personalisation()
        if self.early_stopping_metric not in ("val_loss", *VALIDATION_METRICS[self.target]):
            _bad(
                "early_stopping_metric",
                self.early_stopping_metric,
                f"'val_loss' or one of {list(VALIDATION_METRICS[self.target])} with target = "
                f"'{self.target}' (instances do not report the others)",
            )
        if self.scaler not in SCALERS:
            _bad("scaler", self.scaler, f"one of {list(SCALERS)}")
        if self.update_encoding not in UPDATE_ENCODINGS:
            _bad("update_encoding", self.update_encoding, f"one of {list(UPDATE_ENCODINGS)}")
        if self.update_encoding != "float32" and self.secure_aggregation:
            # SecAgg+ quantises the update itself before masking; the server never sees it.
            _bad(
                "update_encoding",
                self.update_encoding,
                "'float32' with secure-aggregation = true (SecAgg+ quantises updates itself)",
            )
        if self.evaluate_on_receipt == "auto":
            object.__setattr__(self, "evaluate_on_receipt", self.one_exchange_equivalent())
        elif not isinstance(self.evaluate_on_receipt, bool):
            _bad("evaluate_on_receipt", self.evaluate_on_receipt, "true, false or 'auto'")
        elif self.evaluate_on_receipt:
            self._check_evaluate_on_receipt()
        for name in ("fine_tune_epochs", "grad_accumulation_steps"):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "an integer >= 1")
        self.instance_learning_rate_map()
        self._check_training_options()
        # Imported here: secagg imports the model, whose features module imports this one.
        from sigmax_fl.secagg import settings_problems

        if problems := settings_problems(self):
            raise ConfigError("run-config: " + "; ".join(problems))
        if self.dp == "central":
            self._check_central_dp()
        try:
            self.defences()
        except ValueError as err:
            raise ConfigError(f"run-config: {err}") from None

    def _resolve_use_case(self) -> None:
        """Replace ``auto`` by the use case's value; an explicit value must fit the use case."""
        if self.use_case not in USE_CASES:
            _bad("use_case", self.use_case, f"one of {list(USE_CASES)}")
        for name, choices in (("target", TARGETS), ("personalisation", PERSONALISATION)):
            value = getattr(self, name)
            if value == "auto":
                object.__setattr__(self, name, _USE_CASE_DEFAULTS[self.use_case][name])
            elif value not in choices:
                _bad(name, value, f"'auto' or one of {list(choices)}")
            allowed = _USE_CASE_ALLOWS[self.use_case][name]
            if getattr(self, name) not in allowed:
                _bad(name, value, f"one of {list(allowed)} with use-case = '{self.use_case}'")

    def one_exchange_equivalent(self) -> bool:
        """Whether scores can ride on the train replies without changing history or model.

        Every instance trains and is scored each round, so the scorers are the trainers; no
        early stopping, which would learn of a stale round a round late and train one more;
        and none of the refusals of :meth:`_check_evaluate_on_receipt`. What still differs is
        time and bytes, and an instance whose training fails (or that is gone) goes unscored
        that round, where an evaluate phase of its own might still have scored it.
        """
        return (
            self.fraction_train == 1.0
            and self.fraction_evaluate == 1.0
            and not self.early_stopping_patience
            and not self.secure_aggregation
            and not (self.dp == "local" and self.dp_target_epsilon)
        )

    def _check_evaluate_on_receipt(self) -> None:
        """Refuse scoring in the train reply where it would lose scores the two phases keep.

        SecAgg+ rounds are their own four exchanges (:mod:`sigmax_fl.secagg`). Scores travel
        with the train messages, so without training there are none; and under local DP with
        a budget, an instance that has spent it refuses every train message from then on, so
        it would never be scored again.
        """
        if self.secure_aggregation:
            _bad(
                "evaluate_on_receipt",
                True,
                "false with secure-aggregation = true (SecAgg+ rounds keep their own phases)",
            )
        if self.fraction_train == 0:
            _bad("evaluate_on_receipt", True, "false with fraction-train = 0 (nothing trains)")
        if self.dp == "local" and self.dp_target_epsilon:
            _bad(
                "evaluate_on_receipt",
                True,
                "false with dp = 'local' and a dp-target-epsilon (an instance whose budget is "
                "spent refuses training, and would no longer be scored)",
            )

    def _check_training_options(self) -> None:
        """Options that could not take effect together are errors, not silent no-ops.

        DP-SGD (``dp = "local"``) clips and noises per-row gradients in its own float32 loop,
        which neither accumulates micro-batches nor autocasts; with secure aggregation the
        server would see each instance's feature sums in the clear, which the masking of the
        model updates does not cover.
        """
        if self.dp == "local":
            if self.mixed_precision:
                _bad("mixed_precision", True, "false with dp = 'local' (DP-SGD runs in float32)")
            if self.grad_accumulation_steps > 1:
                _bad(
                    "grad_accumulation_steps",
                    self.grad_accumulation_steps,
                    "1 with dp = 'local' (DP-SGD samples its own batches; lower batch-size "
                    "instead)",
                )
        if self.scaler == "federated" and self.secure_aggregation:
            _bad(
                "scaler",
                self.scaler,
                "'local' with secure-aggregation = true: the federated scaler's per-instance "
                "feature sums are not masked, so the server would see them in the clear",
            )

    def _check_personalisation(self) -> None:
        """Refuse a personalisation that cannot take effect with the other options.

        local-head needs a model that names its head, and cannot run under SecAgg+, which masks
        the whole model's update (:mod:`sigmax_fl.secagg` has no body/head split). fine-tune
        under local DP would send validation metrics of a model trained on the raw training
        rows outside the DP-SGD accounting.
        """
        if self.personalisation == "local-head":
            from sigmax_fl.model import head_keys  # model -> features -> this module

            try:
                head_keys(self.model)
            except ValueError as err:
                raise ConfigError(f"run-config 'model' = {self.model!r}: {err}") from None
            if self.secure_aggregation:
                _bad(
                    "secure_aggregation",
                    self.secure_aggregation,
                    "false with personalisation = 'local-head' (SecAgg+ masks the whole "
                    "model's update; use personalisation = 'fine-tune' with it)",
                )
        if self.personalisation == "fine-tune" and self.dp == "local":
            _bad(
                "personalisation",
                self.personalisation,
                "'none' or 'local-head' with dp = 'local' (fine-tuning on the raw training "
                "rows would be outside the DP-SGD accounting of the metrics sent)",
            )

    def instance_learning_rate_map(self) -> dict[str, float]:
        """``instance-learning-rates`` parsed: instance id -> learning rate."""
        rates: dict[str, float] = {}
        for item in filter(
            None, (part.strip() for part in self.instance_learning_rates.split(","))
        ):
            name, sep, value = item.partition("=")
            try:
                rate = float(value)
            except ValueError:
                rate = 0.0
            if not sep or not name.strip() or not rate > 0 or name.strip() in rates:
                _bad(
                    "instance_learning_rates",
                    self.instance_learning_rates,
                    f"'name=rate,...' with distinct names and rates > 0 (bad item {item!r})",
                )
            rates[name.strip()] = rate
        return rates

    def _check_central_dp(self) -> None:
        """Central DP's sensitivity bound needs every share <= max-weight-share, on clipped updates.

        Robust rules and the adaptive norm screen let one instance change whether (or how much)
        another counts, which the Gaussian mechanism's sensitivity does not cover; with fewer
        replies than 1 / max-weight-share the cap cannot hold.
        """
        if self.aggregation != "weighted-fedavg":
            _bad("aggregation", self.aggregation, "'weighted-fedavg' with dp = 'central'")
        needed = math.ceil(1 / self.max_weight_share - 1e-9)
        if self.min_train_replies < needed:
            _bad(
                "min_train_replies",
                self.min_train_replies,
                f">= {needed} with dp = 'central', so no share exceeds max-weight-share "
                f"{self.max_weight_share}",
            )

    def training_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`sigmax_fl.task.train` this run config sets.

        Every training on an instance (a round's, a fine-tuning) passes the same ones.
        """
        return {
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "optimizer": self.optimizer,
            "grad_accumulation_steps": self.grad_accumulation_steps,
            "mixed_precision": self.mixed_precision,
        }

    def strategy(self, noise_std: float = 0.0) -> WeightedFedAvg:
        """The round's sampling, screening and averaging, as this run config says."""
        return WeightedFedAvg(
            defences=self.defences(),
            wait_for_nodes_timeout=self.wait_for_nodes_timeout,
            query_timeout=min(self.round_timeout, QUERY_TIMEOUT),
            fraction_train=self.fraction_train,
            fraction_evaluate=self.fraction_evaluate,
            min_train_nodes=self.min_train_nodes,
            min_evaluate_nodes=self.min_train_nodes,
            min_available_nodes=self.min_available_nodes,
            seed=self.seed,
            noise_std=noise_std,
        )

    def defences(self) -> Defences:
        """The strategy's screening and aggregation settings."""
        central = self.dp == "central"
        return Defences(
            aggregation=self.aggregation,
            # Central DP clips every update to the DP bound: the screen is then data-independent.
            max_update_norm=self.dp_clip_norm if central else self.max_update_norm,
            max_update_norm_ratio=self.max_update_norm_ratio,
            update_norm_policy="clip" if central else self.update_norm_policy,
            max_examples_per_node=self.max_examples_per_node,
            max_weight_share=self.max_weight_share,
            min_train_replies=self.min_train_replies,
        )

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> Settings:
        """Build from ``context.run_config``; unknown keys and wrong types are errors."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(config) - set(by_key))
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {unknown}; known keys: {sorted(by_key)}")
        values: dict[str, Any] = {}
        for key, value in config.items():
            f = by_key[key]
            expected = _TYPES[str(f.type)]
            if float in expected and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (
                isinstance(value, bool) and bool not in expected
            ):
                raise ConfigError(
                    f"run-config '{key}' = {value!r}: expected "
                    f"{' or '.join(t.__name__ for t in expected)}, got {type(value).__name__}"
                )
            values[f.name] = value
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping, as written to the run's outputs."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float,),
    "str": (str,),
    "bool": (bool,),
    "bool | str": (bool, str),
}
"""A field's annotation -> the run-config value types it takes (TOML has no other)."""


def _bad(name: str, value: object, expected: str) -> None:
    raise ConfigError(f"run-config '{name.replace('_', '-')}' = {value!r}: expected {expected}")
