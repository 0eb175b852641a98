"""Which data an instance trains on: bundled names, ``name=path`` entries, synthetic venues.

The ClientApp does not run from the project folder (simulation runs it from the installed
app bundle, deployment from wherever the SuperNode was started), so every path is made
absolute here, against one data directory that can be named explicitly.

An entry ``synthetic:N[:key=value]...`` expands to N generated instances
``synthetic-0000 ..`` (see :mod:`sigmax_fl.data.synthetic`); synthetic data always keeps
venue ``synthetic`` and an id starting with ``synthetic-``, so that no report can pass it
off as a real market.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from sigmax_fl.data import synthetic
from sigmax_fl.data.errors import DataError
from sigmax_fl.paths import project_root

DATA_DIR_ENV = "SIGMAX_FL_DATA_DIR"


@dataclass(frozen=True)
class Bundled:
    """A real series shipped in ``data/`` (see data/PROVENANCE.md)."""

    file: str
    venue: str
    asset: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.file}#{self.asset}" if self.asset else self.file


BUNDLED: dict[str, Bundled] = {
    "coinbase-btc-usd-1d": Bundled("Coinbase_BTCUSD_d.csv", "coinbase"),
    "coinbase-btc-usd-1h": Bundled("Coinbase_BTCUSD_1h.csv", "coinbase"),
    "bitstamp-btc-usd-1d": Bundled("bitstamp_BTC_ETH_LTC_USD_d.csv", "bitstamp", "BTC"),
    "bitstamp-eth-usd-1d": Bundled("bitstamp_BTC_ETH_LTC_USD_d.csv", "bitstamp", "ETH"),
    "bitstamp-ltc-usd-1d": Bundled("bitstamp_BTC_ETH_LTC_USD_d.csv", "bitstamp", "LTC"),
}


@dataclass(frozen=True)
class DataSource:
    """One instance's data: who it is, where its bars are, and on which venue."""

    instance_id: str
    path: str
    """Absolute file path, with ``#ASSET`` for a wide multi-asset file; or the canonical
    ``synthetic:instance=K:...`` spec of a generated series."""
    venue: str = ""


def default_data_dir() -> Path:
    """``$SIGMAX_FL_DATA_DIR``, else the checkout's ``data/`` (see :mod:`sigmax_fl.paths`)."""
    if env := os.environ.get(DATA_DIR_ENV):
        return Path(env).expanduser().resolve()
    root = project_root()
    if root is None:
        raise DataError(
            "data-dir",
            f"cannot find the project's data/ folder; set run config 'data-dir' or ${DATA_DIR_ENV}",
            field="data-dir",
        )
    return root / "data"


def resolve_data_dir(data_dir: str | Path = "") -> Path:
    """The directory relative paths and bundled names are read from."""
    return Path(data_dir).expanduser().resolve() if str(data_dir) else default_data_dir()


def synthetic_label(instance_id: str) -> str:
    """An instance id that says it is synthetic (``desk-a`` -> ``synthetic-desk-a``)."""
    prefix = f"{synthetic.PREFIX}-"
    return instance_id if instance_id.startswith(prefix) else prefix + instance_id


def synthetic_sources(text: str, instance_id: str = "") -> list[DataSource]:
    """The instances a ``synthetic:...`` entry names, venue ``synthetic``."""
    spec, instances = synthetic.parse_spec(text)
    if instance_id and len(instances) > 1:
        raise DataError(
            "data-sources",
            f"'{instance_id}={text}' names {len(instances)} instances; a custom id fits "
            "one (synthetic:instance=K)",
            field="data-sources",
        )
    return [
        DataSource(
            synthetic_label(instance_id) if instance_id else synthetic.instance_id(i),
            spec.path(i),
            synthetic.VENUE,
        )
        for i in instances
    ]


def _split_entry(spec: str) -> tuple[str, str]:
    """``id=target`` -> (id, target); a bare target (also ``synthetic:...:k=v``) has no id."""
    if synthetic.is_synthetic(spec) or "=" not in spec:
        return "", spec
    instance_id, _, target = spec.partition("=")
    return instance_id.strip(), target.strip()


def resolve_source(spec: str, data_dir: str | Path = "", *, venue: str = "") -> DataSource:
    """Turn one ``data-sources`` entry into a :class:`DataSource`.

    Parameters
    ----------
    spec : str
        A bundled name (``coinbase-btc-usd-1d``), a path, ``instance-id=path-or-name``, or
        one synthetic instance (``synthetic:instance=K[:key=value]...``).
        A path may end in ``#ASSET`` to pick one asset of a wide file.
    data_dir : str or Path
        Where bundled files and relative paths live; empty means :func:`default_data_dir`.
    venue : str
        Overrides the venue (a SuperNode's node config says it); not for synthetic data,
        whose venue is always ``synthetic``.
    """
    spec = spec.strip()
    if not spec:
        raise DataError("data-sources", "empty entry", field="data-sources")
    instance_id, target = _split_entry(spec)
    if synthetic.is_synthetic(target):
        sources = synthetic_sources(target, instance_id)
        if len(sources) > 1:
            raise DataError(
                "data-sources",
                f"'{target}' names {len(sources)} instances; here one is needed "
                "(synthetic:instance=K)",
                field="data-sources",
            )
        return sources[0]
    root = resolve_data_dir(data_dir)
    if target in BUNDLED:
        bundled = BUNDLED[target]
        path = root / bundled.spec
        if not (root / bundled.file).is_file():
            raise DataError(
                root / bundled.file,
                f"bundled series '{target}' not found; set run config 'data-dir' or "
                f"${DATA_DIR_ENV} to the project's data/ folder",
                field="data-dir",
            )
        return DataSource(instance_id or target, str(path), venue or bundled.venue)
    path = Path(target).expanduser()
    path = path if path.is_absolute() else root / path
    file = Path(str(path).split("#", 1)[0])
    if not file.is_file():
        raise DataError(
            file,
            f"not a file and not a bundled series name (bundled: {sorted(BUNDLED)})",
            field="data-sources",
        )
    return DataSource(instance_id or file.stem, str(path), venue)


def parse_sources(text: str, data_dir: str | Path = "") -> list[DataSource]:
    """Parse the comma-separated ``data-sources`` run-config value; instance ids are unique.

    ``synthetic:N[:key=value]...`` entries expand to N instances each.
    """
    sources: list[DataSource] = []
    for entry in (e.strip() for e in text.split(",")):
        if synthetic.is_synthetic(entry):
            sources.extend(synthetic_sources(entry))
        elif entry:
            sources.append(resolve_source(entry, data_dir))
    if not sources:
        raise DataError("data-sources", "no data source given", field="data-sources")
    seen: set[str] = set()
    for source in sources:
        if source.instance_id in seen:
            raise DataError(
                "data-sources",
                f"instance id '{source.instance_id}' appears twice; name entries as id=path",
                field="data-sources",
            )
        seen.add(source.instance_id)
    return sources


def source_for_node(node_config: dict, data_sources: str, data_dir: str | Path = "") -> DataSource:
    """The data a node trains on: its own node config first, else its simulation partition.

    A SuperNode started with ``--node-config "data-path=... venue=... instance-id=..."`` uses
    that file. A simulated node (``partition-id``, ``num-partitions``) takes entry
    ``partition-id`` of ``data-sources``.
    """
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        source = resolve_source(path, data_dir, venue=str(node_config.get("venue", "")))
        return _named(source, node_config)
    if "partition-id" in node_config:
        sources = simulation_sources(data_sources, data_dir)
        partition, partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if partitions > len(sources):
            raise DataError(
                "data-sources",
                f"{partitions} simulated SuperNodes but only {len(sources)} data sources; run "
                f'with --federation-config "num-supernodes={len(sources)}" or add sources',
                field="data-sources",
            )
        return _named(sources[partition], node_config)
    raise DataError(
        "node config",
        "no 'data-path' (a SuperNode needs --node-config \"data-path=FILE instance-id=NAME\") "
        "and no simulation 'partition-id'",
        field="data-path",
    )


def simulation_sources(data_sources: str, data_dir: str | Path = "") -> tuple[DataSource, ...]:
    """The simulated instances: :func:`parse_sources`, once per process and run config.

    A simulated node looks up its partition on every message, and parsing is linear in the
    federation (about 5 ms for ``synthetic:1000``); the answer only changes with the run config
    and the data directory the paths resolve against.
    """
    return _parsed(data_sources, resolve_data_dir(data_dir))


@functools.lru_cache(maxsize=8)
def _parsed(data_sources: str, data_dir: Path) -> tuple[DataSource, ...]:
    return tuple(parse_sources(data_sources, data_dir))


def _named(source: DataSource, node_config: dict) -> DataSource:
    """The node config's ``instance-id`` if it has one (still labelled synthetic if so)."""
    if "instance-id" not in node_config:
        return source
    instance_id = str(node_config["instance-id"])
    if source.venue == synthetic.VENUE:
        instance_id = synthetic_label(instance_id)
    return DataSource(instance_id, source.path, source.venue)


def split_asset(spec: str | Path) -> tuple[Path, str | None]:
    """``data/file.csv#ETH`` -> (path, "ETH"): the asset selector of wide files."""
    text = str(spec)
    if "#" in text:
        path, asset = text.rsplit("#", 1)
        return Path(path), asset or None
    return Path(text), None


def source_digest(path: str) -> str:
    """A hash of an instance's data: the file's bytes, or a synthetic series' spec.

    Feature caches key on it, so that a changed export (or generator) rebuilds them.
    """
    if synthetic.is_synthetic(path):
        return synthetic.spec_digest(path)
    file, _ = split_asset(path)
    return hashlib.sha256(file.read_bytes()).hexdigest()
