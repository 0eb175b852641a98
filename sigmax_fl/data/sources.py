"""Which file an instance trains on: bundled series names, ``name=path`` entries, data dir.

The ClientApp does not run from the project folder (simulation runs it from the installed
app bundle, deployment from wherever the SuperNode was started), so every path is made
absolute here, against one data directory that can be named explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
    """Absolute file path, with ``#ASSET`` for a wide multi-asset file."""
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


def resolve_source(spec: str, data_dir: str | Path = "", *, venue: str = "") -> DataSource:
    """Turn one ``data-sources`` entry into a :class:`DataSource`.

    Parameters
    ----------
    spec : str
        A bundled name (``coinbase-btc-usd-1d``), a path, or ``instance-id=path-or-name``.
        A path may end in ``#ASSET`` to pick one asset of a wide file.
    data_dir : str or Path
        Where bundled files and relative paths live; empty means :func:`default_data_dir`.
    venue : str
        Overrides the venue (a SuperNode's node config says it).
    """
    spec = spec.strip()
    if not spec:
        raise DataError("data-sources", "empty entry", field="data-sources")
    instance_id, _, target = spec.partition("=") if "=" in spec else ("", "", spec)
    instance_id, target = instance_id.strip(), target.strip()
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
    """Parse the comma-separated ``data-sources`` run-config value; instance ids are unique."""
    sources = [resolve_source(entry, data_dir) for entry in text.split(",") if entry.strip()]
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
        return DataSource(
            str(node_config.get("instance-id", source.instance_id)), source.path, source.venue
        )
    if "partition-id" in node_config:
        sources = parse_sources(data_sources, data_dir)
        partition, partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if partitions > len(sources):
            raise DataError(
                "data-sources",
                f"{partitions} simulated SuperNodes but only {len(sources)} data sources; run "
                f'with --federation-config "num-supernodes={len(sources)}" or add sources',
                field="data-sources",
            )
        source = sources[partition]
        if "instance-id" in node_config:
            return DataSource(str(node_config["instance-id"]), source.path, source.venue)
        return source
    raise DataError(
        "node config",
        "no 'data-path' (a SuperNode needs --node-config \"data-path=FILE instance-id=NAME\") "
        "and no simulation 'partition-id'",
        field="data-path",
    )
