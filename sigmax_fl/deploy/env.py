"""The ``FL_*`` environment variables of the SIGMAX entry points, parsed once into options.

The original SIGMAX deployment configured ``scripts.fl_server`` and ``scripts.fl_client`` by
environment variables alone (containers, systemd units), and the entry points keep that
contract. Every variable is checked before any process starts, files included, and a missing
or malformed one is a one-line :class:`EnvError` naming it: an operator reads a container's
last log line, not a traceback. This module imports neither Flower nor torch, so a bad
variable is reported in well under a second.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sigmax_fl.deploy.credentials import ServerCertificates, names_host

log = logging.getLogger("sigmax_fl.deploy")

SERVER_VARIABLES: dict[str, str] = {
    "FL_SERVER": "HOST:PORT the SuperLink listens on (default 0.0.0.0:8080)",
    "FL_NUM_ROUNDS": "federated rounds, run config num-server-rounds (default 10)",
    "FL_MIN_CLIENTS": "instances a round needs: min-available-nodes and min-train-nodes "
    "(default 2)",
    "FL_WAIT_TIMEOUT": "seconds a round waits for FL_MIN_CLIENTS instances before the run "
    "fails, run config wait-for-nodes-timeout (default 300)",
    "FL_INSECURE": "1: no TLS (a warning is logged); default: TLS",
    "FL_CA_CERT": "PEM CA certificate (--ssl-ca-certfile); required with TLS",
    "FL_SERVER_CERT": "PEM SuperLink certificate (--ssl-certfile); required with TLS",
    "FL_SERVER_KEY": "PEM SuperLink private key (--ssl-keyfile); required with TLS",
    "FL_SUPERNODE_AUTH": "0: accept SuperNodes without a registered key (a warning is "
    "logged); default with TLS: 1",
    "FL_AUTHORIZED_KEYS": "comma-separated OpenSSH public key files registered at start",
    "FL_RUN_CONFIG": "more run config, Flower's 'key=value key=value' syntax",
    "FL_STATE_DIR": "SuperLink database, Flower home and logs (default ~/.sigmax-fl/server)",
    "FL_APP_DIR": "the sigmax-fl project folder submitted with flwr run (default: this checkout)",
    "FL_KEEP_RUNNING": "1: keep the SuperLink serving after a completed run (Kubernetes "
    "Deployment); default 0: exit",
}
"""Variables :mod:`sigmax_fl.deploy.server` reads, with what each means."""

CLIENT_VARIABLES: dict[str, str] = {
    "FL_SERVER": "HOST:PORT of the SuperLink (required)",
    "FL_CLIENT_ID": "this instance's id, node config instance-id (required)",
    "DATA_SOURCE": "path of this instance's OHLCV file (#ASSET for a wide file) or a "
    "bundled series name (required)",
    "FL_INSECURE": "1: no TLS (a warning is logged); default: TLS",
    "FL_CA_CERT": "PEM CA certificate to verify the SuperLink; required with TLS",
    "FL_NODE_KEY": "OpenSSH ECDSA private key for SuperNode authentication",
    "FL_STATE_DIR": "Flower home and logs (default ~/.sigmax-fl/client-FL_CLIENT_ID)",
}
"""Variables :mod:`sigmax_fl.deploy.client` reads, with what each means."""

APP_VARIABLES: dict[str, str] = {
    "SIGMAX_FL_OUTPUTS_DIR": "root of run folders (ServerApp)",
    "SIGMAX_FL_DATA_DIR": "folder of bundled series and relative data paths (ClientApp)",
    "SIGMAX_FL_CACHE_DIR": "feature cache on the instance's disk (ClientApp)",
}
"""Variables the app itself reads in the processes the entry points start."""

DEFAULT_SERVER = "0.0.0.0:8080"
RUN_CONFIG_FROM_VARIABLES = {
    "num-server-rounds": "FL_NUM_ROUNDS",
    "min-available-nodes": "FL_MIN_CLIENTS",
    "min-train-nodes": "FL_MIN_CLIENTS",
    "wait-for-nodes-timeout": "FL_WAIT_TIMEOUT",
}
"""Run-config keys the entry point sets from its own variables (so FL_RUN_CONFIG may not)."""

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")  # as flwr.common.config
_BIND_ALL = {"0.0.0.0": "127.0.0.1", "::": "::1"}
_DATA_HELP = (
    "export this instance's own bars (e.g. Binance klines CSVs from "
    "https://data.binance.vision/?prefix=data/spot/daily/klines/, Coinbase candles from "
    "GET https://api.exchange.coinbase.com/products/BTC-USD/candles, or CCXT fetch_ohlcv "
    "saved as CSV) and set DATA_SOURCE to that file"
)


class EnvError(ValueError):
    """A missing or malformed variable; the message is one line and starts with its name."""

    def __init__(self, name: str, value: str | None, problem: str) -> None:
        where = f"{name} is not set" if value is None else f"{name}={value!r}"
        super().__init__(f"{where}: {problem}")
        self.name = name


@dataclass(frozen=True)
class Address:
    """A SuperLink address; ``connect`` is where a process on the same host reaches it."""

    host: str
    port: int

    def __str__(self) -> str:
        return _join(self.host, self.port)

    @property
    def connect_host(self) -> str:
        """The host to dial: a bind-all address (``0.0.0.0``, ``::``) means loopback.

        Flower's SuperLink does the same when it starts its own SuperExec, so this is also
        the name the SuperLink certificate must carry.
        """
        return _BIND_ALL.get(self.host, self.host)

    @property
    def connect(self) -> str:
        """``HOST:PORT`` to dial."""
        return _join(self.connect_host, self.port)


@dataclass(frozen=True)
class ServerOptions:
    """How to start the SuperLink (everything but the run config)."""

    address: Address
    tls: ServerCertificates | None
    supernode_auth: bool
    authorized_keys: tuple[Path, ...]
    state_dir: Path
    app_dir: Path
    keep_running: bool = False


@dataclass(frozen=True)
class ClientOptions:
    """How to start one instance's SuperNode (everything but its node config)."""

    superlink: Address
    root_certificates: Path | None
    """CA certificate; None means the explicitly insecure mode."""
    node_key: Path | None
    state_dir: Path


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return None if value is None or not value.strip() else value.strip()


def _required(env: Mapping[str, str], name: str, why: str) -> str:
    value = _get(env, name)
    if value is None:
        raise EnvError(name, None, why)
    return value


def flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A yes/no variable: ``1``/``true``/``yes`` or ``0``/``false``/``no``; blank is unset.

    Blank must not mean "off": ``FL_SUPERNODE_AUTH=`` would otherwise disable a defence.
    """
    value = _get(env, name)
    if value is None:
        return default
    text = value.lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise EnvError(name, value, "expected 1 or 0")


def number(env: Mapping[str, str], name: str, default: float, kind: type = int) -> Any:
    """A positive ``int`` or ``float`` variable."""
    value = _get(env, name)
    if value is None:
        return kind(default)
    try:
        parsed = kind(value)
    except ValueError:
        parsed = None
    if parsed is None or not parsed > 0 or parsed != parsed or parsed == float("inf"):
        expected = "a whole number >= 1" if kind is int else "a positive number of seconds"
        raise EnvError(name, value, f"expected {expected}")
    return parsed


def address(value: str, name: str = "FL_SERVER") -> Address:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s]+):(\d+)", value.strip())
    if not match:
        raise EnvError(name, value, "expected HOST:PORT, e.g. fl-server:8080 or 0.0.0.0:8080")
    host = match[1] or match[3]
    port = int(match[2] or match[4])
    if not 1 <= port <= 65535:
        raise EnvError(name, value, "port must be 1..65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST.match(host):
            raise EnvError(name, value, f"'{host}' is not a host name or IP address") from None
    return Address(host, port)


def _file(env: Mapping[str, str], name: str, why: str) -> Path:
    value = _required(env, name, why)
    path = Path(value).expanduser()
    if not path.is_file():
        raise EnvError(name, value, "no such file")
    try:
        path.read_bytes()
    except OSError as err:
        raise EnvError(name, value, f"cannot read it ({err.strerror})") from None
    return path.resolve()


def _certificate(env: Mapping[str, str], name: str, why: str) -> tuple[Path, x509.Certificate]:
    path = _file(env, name, why)
    try:
        return path, x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise EnvError(name, str(path), "not a PEM certificate") from None


def public_key_file(path_text: str, name: str) -> Path:
    """An OpenSSH ECDSA public key file, as ``flwr supernode register`` takes it."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise EnvError(name, path_text, "no such file")
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise EnvError(
            name,
            path_text,
            "not an OpenSSH ECDSA public key (make a pair with ssh-keygen -t ecdsa -b 384 "
            "-N '' -f node.key, or python -m sigmax_fl.deploy.credentials)",
        )
    return path.resolve()


def _private_key_file(env: Mapping[str, str], name: str) -> Path | None:
    if _get(env, name) is None:
        return None
    path = _file(env, name, "")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EnvError(
            name,
            str(path),
            "not an unencrypted OpenSSH ECDSA private key (ssh-keygen -t ecdsa -b 384 -N '')",
        )
    return path


def _insecure(env: Mapping[str, str], role: str) -> bool:
    insecure = flag(env, "FL_INSECURE", False)
    if insecure:
        log.warning(
            "FL_INSECURE=1: the %s talks to the federation WITHOUT TLS; model updates and "
            "node identities cross the network in clear text. Use it on a trusted test "
            "network only.",
            role,
        )
    return insecure


def _state_dir(env: Mapping[str, str], default: str) -> Path:
    value = _get(env, "FL_STATE_DIR")
    path = Path(value or default).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EnvError("FL_STATE_DIR", str(path), f"cannot create it ({err.strerror})") from None
    return path.resolve()


def server_tls(env: Mapping[str, str], bind: Address) -> ServerCertificates | None:
    """The SuperLink's TLS files, or None for ``FL_INSECURE=1``.

    The certificate must name the host the SuperLink's own SuperExec and the ``flwr`` CLI
    dial (loopback for a bind-all address): checked here, because Flower would only report
    a failed connection.
    """
    if _insecure(env, "SuperLink"):
        return None
    why = "TLS needs it (or set FL_INSECURE=1 explicitly)"
    ca_path, _ = _certificate(env, "FL_CA_CERT", why)
    cert_path, cert = _certificate(env, "FL_SERVER_CERT", why)
    key_path = _file(env, "FL_SERVER_KEY", why)
    try:
        serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise EnvError(
            "FL_SERVER_KEY", str(key_path), "not an unencrypted PEM private key"
        ) from None
    if not names_host(cert, bind.connect_host):
        raise EnvError(
            "FL_SERVER_CERT",
            str(cert_path),
            f"its subjectAltName lacks {bind.connect_host}, which the SuperLink's own "
            "SuperExec and the flwr CLI dial (python -m sigmax_fl.deploy.credentials adds it)",
        )
    return ServerCertificates(ca_path, cert_path, key_path)


def server_options(
    env: Mapping[str, str], bind: Address | None = None, app_dir: Path | None = None
) -> ServerOptions:
    """Everything about the SuperLink from the environment.

    Parameters
    ----------
    env : Mapping[str, str]
        The environment (``os.environ``).
    bind : Address | None
        Listen address; ``FL_SERVER`` (default 0.0.0.0:8080) if None. The Python API
        passes ``FederatedConfig.server_address`` here.
    app_dir : Path | None
        The project submitted with ``flwr run``; ``FL_APP_DIR``, else this checkout.

    Raises
    ------
    EnvError
        For the first missing or malformed variable.
    """
    if bind is None:
        bind = address(_get(env, "FL_SERVER") or DEFAULT_SERVER)
    tls = server_tls(env, bind)
    auth = flag(env, "FL_SUPERNODE_AUTH", tls is not None)
    if auth and tls is None:
        raise EnvError("FL_SUPERNODE_AUTH", env.get("FL_SUPERNODE_AUTH"), "needs TLS")
    if tls is not None and not auth:
        log.warning(
            "FL_SUPERNODE_AUTH=0: any SuperNode that trusts the CA can join and send updates"
        )
    keys_text = _get(env, "FL_AUTHORIZED_KEYS")
    keys = tuple(
        public_key_file(part.strip(), "FL_AUTHORIZED_KEYS")
        for part in (keys_text or "").split(",")
        if part.strip()
    )
    if keys and not auth:
        raise EnvError(
            "FL_AUTHORIZED_KEYS", keys_text, "keys are only used with SuperNode authentication"
        )
    return ServerOptions(
        address=bind,
        tls=tls,
        supernode_auth=auth,
        authorized_keys=keys,
        state_dir=_state_dir(env, "~/.sigmax-fl/server"),
        app_dir=app_dir or _app_dir(env),
        keep_running=flag(env, "FL_KEEP_RUNNING", False),
    )


def _app_dir(env: Mapping[str, str]) -> Path:
    from sigmax_fl.paths import project_root

    value = _get(env, "FL_APP_DIR")
    if value is None:
        root = project_root()
        if root is None:
            raise EnvError("FL_APP_DIR", None, "no sigmax-fl checkout found; name its folder")
        return root
    path = Path(value).expanduser().resolve()
    if not (path / "pyproject.toml").is_file():
        raise EnvError("FL_APP_DIR", value, "no pyproject.toml there (the sigmax-fl folder)")
    return path


def app_config(app_dir: Path) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` defaults."""
    return tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def server_run_config(env: Mapping[str, str], app_dir: Path) -> dict[str, Any]:
    """Run-config overrides from the server's variables, validated before anything starts.

    ``FL_NUM_ROUNDS``, ``FL_MIN_CLIENTS`` and ``FL_WAIT_TIMEOUT`` set their keys (see
    :data:`RUN_CONFIG_FROM_VARIABLES`); ``FL_RUN_CONFIG`` adds any other key.

    Raises
    ------
    EnvError
        For a malformed variable or a run config the app would reject.
    """
    from sigmax_fl.settings import ConfigError, Settings

    clients = number(env, "FL_MIN_CLIENTS", 2)
    overrides: dict[str, Any] = {
        "num-server-rounds": number(env, "FL_NUM_ROUNDS", 10),
        "min-available-nodes": clients,
        "min-train-nodes": clients,
        "wait-for-nodes-timeout": number(env, "FL_WAIT_TIMEOUT", 300.0, float),
    }
    text = _get(env, "FL_RUN_CONFIG")
    if text is not None:
        extra = parse_pairs(text, "FL_RUN_CONFIG")
        clash = sorted(set(extra) & set(RUN_CONFIG_FROM_VARIABLES))
        if clash:
            names = sorted({RUN_CONFIG_FROM_VARIABLES[k] for k in clash})
            raise EnvError("FL_RUN_CONFIG", text, f"set {clash} with {names} instead")
        overrides.update(extra)
    try:
        Settings.from_run_config({**app_config(app_dir), **overrides})
    except ConfigError as err:
        raise EnvError("FL_RUN_CONFIG", text or "", str(err)) from None
    return overrides


def parse_pairs(text: str, name: str) -> dict[str, Any]:
    """Flower's ``key=value key='a string'`` syntax, strictly: leftovers are an error."""
    if _PAIR.sub("", text).strip():
        raise EnvError(name, text, "expected 'key=value key=value' (quote strings with spaces)")
    try:
        return tomllib.loads("\n".join(f"{k} = {v}" for k, v in _PAIR.findall(text)))
    except tomllib.TOMLDecodeError as err:
        raise EnvError(name, text, f"a value is not a TOML bool, number or string: {err}") from None


def client_options(
    env: Mapping[str, str], name: str, superlink: Address | None = None
) -> ClientOptions:
    """Everything about the SuperNode but its node config, from the environment.

    Parameters
    ----------
    env : Mapping[str, str]
        The environment.
    name : str
        The instance's id; names the default state folder.
    superlink : Address | None
        SuperLink address; ``FL_SERVER`` (required) if None. The Python API passes
        ``FederatedConfig.server_address`` here.

    Raises
    ------
    EnvError
        For the first missing or malformed variable.
    """
    if superlink is None:
        superlink = address(
            _required(env, "FL_SERVER", "the SuperLink's HOST:PORT, e.g. fl-server:8080")
        )
    root = None
    if not _insecure(env, "SuperNode"):
        root, _ = _certificate(
            env, "FL_CA_CERT", "TLS needs the CA certificate (or set FL_INSECURE=1 explicitly)"
        )
    key = _private_key_file(env, "FL_NODE_KEY")
    if key is not None and root is None:
        raise EnvError("FL_NODE_KEY", str(key), "SuperNode authentication needs TLS")
    if key is None and root is not None:
        log.warning(
            "FL_NODE_KEY is not set: a SuperLink with SuperNode authentication (the default) "
            "refuses this SuperNode"
        )
    return ClientOptions(
        superlink=superlink,
        root_certificates=root,
        node_key=key,
        state_dir=_state_dir(env, f"~/.sigmax-fl/client-{name}"),
    )


def client_id(env: Mapping[str, str]) -> str:
    """``FL_CLIENT_ID``: letters, digits, ``_``, ``.``, ``-`` (it names files and logs)."""
    value = _required(env, "FL_CLIENT_ID", "this instance's id, e.g. sigmax_instance_1")
    if not INSTANCE_ID.match(value):
        raise EnvError("FL_CLIENT_ID", value, f"expected {INSTANCE_ID.pattern}")
    return value


def data_source(env: Mapping[str, str], data_dir: str = "") -> dict[str, str]:
    """The node config of ``DATA_SOURCE``: ``data-path`` (absolute) and ``venue``.

    A bundled series name is taken as is. A file is read once here with the loader the
    ClientApp uses, so a wrong layout fails at start, not in the first round. A bare word
    that is neither (the old guide's ``binance``) is a venue, not data.

    Raises
    ------
    EnvError
        Naming DATA_SOURCE, with how to get a file for a venue name.
    """
    from sigmax_fl.data import BUNDLED, DataError, load_ohlcv, resolve_source

    value = _required(
        env, "DATA_SOURCE", f"{_DATA_HELP}, or name a bundled series ({', '.join(BUNDLED)})"
    )
    if value not in BUNDLED:
        file_part, hash_sign, asset = value.partition("#")
        file = Path(file_part).expanduser()
        if not file.is_file():
            if re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", value):
                raise EnvError(
                    "DATA_SOURCE",
                    value,
                    f"a venue name is not data: {_DATA_HELP}, or name a bundled series "
                    f"({', '.join(BUNDLED)})",
                )
            raise EnvError("DATA_SOURCE", value, "no such file")
        value = f"{file.resolve()}{hash_sign}{asset}"
    try:
        source = resolve_source(value, data_dir)
        if value not in BUNDLED:
            load_ohlcv(source.path, policy="repair")
    except DataError as err:
        raise EnvError("DATA_SOURCE", value, " ".join(str(err).split())) from None
    return {"data-path": source.path, "venue": source.venue}


def variables_help(variables: dict[str, str]) -> str:
    """The variables, one per line, for ``--help``."""
    rows = {**variables, **APP_VARIABLES}
    width = max(map(len, rows))
    return "environment variables:\n" + "\n".join(
        f"  {name:<{width}}  {text}" for name, text in rows.items()
    )


def start_entry_point(
    prog: str, doc: str, variables: dict[str, str], argv: Sequence[str] | None
) -> None:
    """Answer ``--help`` (the module doc's second paragraph and the variables) and set up logging.

    The entry points take no flags: SIGMAX's deployment scripts configure them by environment
    alone, so anything but ``--help`` is an argparse error (exit status 2).
    """
    argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[1].replace("``", ""),
        epilog=variables_help(variables),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"{prog}: %(levelname)s: %(message)s")
