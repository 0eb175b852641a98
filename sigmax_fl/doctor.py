"""``sigmax-fl doctor``: the troubleshooting section of the SIGMAX guide, as one command.

Each check prints one line ``OK|FAIL|WARN <check>: <what was found / what to do>``:

* ``superlink-address``: the SuperLink's ``HOST:PORT`` resolves;
* ``superlink-port``: a TCP connection to it succeeds within the timeout;
* ``server-cert-chain``, ``server-cert-san``, ``server-key``: the SuperLink's TLS files (when
  given) match: the CA verifies the certificate (signature and validity dates), its
  subjectAltName names the host clients dial, the key belongs to the certificate;
* ``aggregation-kernel`` (with the server's files): the fused aggregation pass builds with
  this host's C compiler (:mod:`sigmax_fl.fused`), else large models average more slowly;
* ``tls-handshake``: a real TLS handshake with the port succeeds, verified with the CA;
* ``node-key``, ``node-key-registered``: the SuperNode key is an ECDSA P-384 OpenSSH key
  whose ``.pub`` matches, and the SuperLink holds that public key;
* ``data``: the data file loads under the strict policy and yields the 50 features with
  enough rows on the run config's calendar;
* ``memory``: an estimate of training memory for the batch size against ``MemAvailable``.

A check whose input is not given prints WARN ``not checked`` (the server's own files print
nothing when absent: an instance host does not have them). Only the standard library and
``cryptography`` are needed for the network and TLS checks; the data check imports pandas,
the memory check torch, the registration check Flower.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import itertools
import logging
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sigmax_fl.deploy.credentials import names_host

OK, WARN, FAIL = "OK", "WARN", "FAIL"

MIN_TRAIN_ROWS = 250
"""Fewer training rows than this (about a year of daily bars) is a WARN: the model will
barely move from its initial weights before validation stops improving."""

MEMORY_FRACTION = 0.5
"""WARN when the training estimate exceeds this share of ``MemAvailable``."""

RUNTIME_BYTES = 450 * 2**20
"""Resident memory of a ClientApp process before it touches data (Python, torch, Flower),
used when it cannot be measured here (torch not importable). Measured on this project's
venv: about 380-450 MiB."""


@dataclass(frozen=True)
class Check:
    """One line of the doctor's output."""

    status: str
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


@dataclass
class DoctorOptions:
    """What to check; ``None`` means "not given" (the check says so, or is left out)."""

    superlink: str | None = None
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    node_key: Path | None = None
    data_source: str | None = None
    data_dir: str = ""
    run_config: dict[str, Any] = field(default_factory=dict)
    timeout: float = 3.0
    check_registration: bool = True
    memory_available: int | None = None
    """Bytes available for training; ``None`` reads ``/proc/meminfo`` (tests set it)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str], **given: Any) -> DoctorOptions:
        """Defaults from the variables the entry points read; ``given`` (not None) wins."""

        def var(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def path(name: str) -> Path | None:
            value = var(name)
            return Path(value).expanduser() if value else None

        defaults: dict[str, Any] = {
            "superlink": var("FL_SERVER"),
            "ca_cert": path("FL_CA_CERT"),
            "server_cert": path("FL_SERVER_CERT"),
            "server_key": path("FL_SERVER_KEY"),
            "node_key": path("FL_NODE_KEY"),
            "data_source": var("DATA_SOURCE"),
        }
        defaults.update({k: v for k, v in given.items() if v is not None})
        return cls(**defaults)


class Doctor:
    """Runs the checks in order, handing each line to ``emit`` as soon as it is known."""

    def __init__(self, options: DoctorOptions, emit: Callable[[Check], None] | None = None):
        self.options = options
        self.emit = emit or (lambda check: None)
        self.results: list[Check] = []
        self.host: str | None = None
        self.port: int | None = None
        self.port_open = False
        self.tls_ok = False
        self.node_public_key: ec.EllipticCurvePublicKey | None = None
        self.train_rows: int | None = None

    def _add(self, status: str, name: str, detail: str) -> None:
        check = Check(status, name, " ".join(detail.split()))
        self.results.append(check)
        self.emit(check)

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.results)

    def run(self) -> list[Check]:
        self.check_address()
        self.check_server_files()
        self.check_aggregation_kernel()
        self.check_handshake()
        self.check_node_key()
        self.check_registration()
        settings = self.check_data()
        self.check_memory(settings)
        return self.results

    # -- network ------------------------------------------------------------------------------

    def check_address(self) -> None:
        from sigmax_fl.deploy.env import EnvError, address

        text = self.options.superlink
        if text is None:
            self._add(WARN, "superlink-address", "not checked: give --superlink or set FL_SERVER")
            return
        try:
            parsed = address(text, "--superlink")
        except EnvError as err:
            self._add(FAIL, "superlink-address", str(err))
            return
        self.host, self.port = parsed.connect_host, parsed.port
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            self._add(
                FAIL,
                "superlink-address",
                f"{self.host} does not resolve ({err.strerror}): check the name in FL_SERVER, "
                "DNS or /etc/hosts on this host",
            )
            return
        ips = sorted({info[4][0] for info in infos})
        self._add(OK, "superlink-address", f"{self.host} resolves to {', '.join(ips)}")
        try:
            with socket.create_connection((self.host, self.port), timeout=self.options.timeout):
                pass
        except TimeoutError:
            self._add(
                FAIL,
                "superlink-port",
                f"{self.host}:{self.port} did not answer within {self.options.timeout:g} s: a "
                "firewall or security group drops the traffic, or the host is down",
            )
            return
        except OSError as err:
            self._add(
                FAIL,
                "superlink-port",
                f"{self.host}:{self.port}: {err.strerror or err}: is the SuperLink running "
                "(sigmax-fl-server) and listening on that port and interface?",
            )
            return
        self.port_open = True
        self._add(OK, "superlink-port", f"{self.host}:{self.port} accepts TCP connections")

    # -- the SuperLink's TLS files ------------------------------------------------------------

    def _dial_host(self) -> str:
        return self.host or "127.0.0.1"

    def check_server_files(self) -> None:
        opts = self.options
        if opts.server_cert is None:
            if opts.server_key is not None:
                self._add(WARN, "server-key", "not checked: give --server-cert with it")
            return
        try:
            chain = x509.load_pem_x509_certificates(opts.server_cert.read_bytes())
        except (OSError, ValueError) as err:
            self._add(FAIL, "server-cert-chain", f"{opts.server_cert}: {_reason(err)}")
            return
        leaf = chain[0]
        if opts.ca_cert is None:
            self._add(WARN, "server-cert-chain", "not checked: give --ca-cert or set FL_CA_CERT")
        else:
            status, detail = verify_chain(chain, opts.ca_cert)
            self._add(status, "server-cert-chain", f"{opts.server_cert}: {detail}")
        host = self._dial_host()
        names = subject_alt_names(leaf)
        if names_host(leaf, host):
            self._add(OK, "server-cert-san", f"subjectAltName {', '.join(names)} covers {host}")
        else:
            self._add(
                FAIL,
                "server-cert-san",
                f"subjectAltName [{', '.join(names) or 'none'}] lacks {host}, the host clients "
                "dial: TLS fails with a hostname mismatch. Reissue it with that name and "
                "loopback (python -m sigmax_fl.deploy.credentials DIR --host NAME)",
            )
        if opts.server_key is None:
            return
        status, detail = key_matches(opts.server_key, leaf)
        self._add(status, "server-key", f"{opts.server_key}: {detail}")

    def check_aggregation_kernel(self) -> None:
        """On the server's host (its TLS files given): whether large models average fast."""
        if self.options.server_cert is None:
            return
        from sigmax_fl import fused

        started = time.monotonic()
        kernel, why = fused.build()
        if kernel is None:
            self._add(
                WARN,
                "aggregation-kernel",
                f"{why}: models of {fused.MIN_PARAMS:,} parameters or more will be averaged by "
                "the torch pass, about 2x slower (install a C compiler, or set CC)",
            )
            return
        self._add(
            OK,
            "aggregation-kernel",
            f"{why} in {time.monotonic() - started:.2f} s: models of {fused.MIN_PARAMS:,} "
            "parameters or more are averaged in one fused pass",
        )

    def check_handshake(self) -> None:
        opts = self.options
        if not self.port_open:
            return
        if opts.ca_cert is None:
            self._add(
                WARN,
                "tls-handshake",
                "not checked: give --ca-cert or set FL_CA_CERT (FL_INSECURE=1 sends updates "
                "in clear text)",
            )
            return
        assert self.host is not None and self.port is not None
        try:
            context = ssl.create_default_context(cafile=str(opts.ca_cert))
        except (OSError, ssl.SSLError) as err:
            self._add(FAIL, "tls-handshake", f"cannot load CA {opts.ca_cert}: {_reason(err)}")
            return
        context.set_alpn_protocols(["h2", "http/1.1"])
        try:
            served = _handshake(context, self.host, self.port, self.options.timeout)
        except ssl.SSLCertVerificationError as err:
            seen = self._served_certificate()
            self._add(
                FAIL,
                "tls-handshake",
                f"{self.host}:{self.port} refused by the CA {opts.ca_cert}: "
                f"{err.verify_message or err.reason}{seen}",
            )
            return
        except (OSError, ssl.SSLError) as err:
            self._add(
                FAIL,
                "tls-handshake",
                f"{self.host}:{self.port}: {_reason(err)}: is it a TLS SuperLink (not "
                "started with FL_INSECURE=1 / --insecure)?",
            )
            return
        self.tls_ok = True
        detail = f"{self.host}:{self.port} verified with {opts.ca_cert}"
        if opts.server_cert is not None and opts.server_cert.is_file():
            try:
                given = x509.load_pem_x509_certificates(opts.server_cert.read_bytes())[0]
            except ValueError:
                given = None
            if given is not None and given.public_bytes(serialization.Encoding.DER) != served:
                self._add(
                    WARN,
                    "tls-handshake",
                    f"{detail}, but it serves another certificate than {opts.server_cert}: "
                    "restart the SuperLink after changing its files",
                )
                return
        self._add(OK, "tls-handshake", detail)

    def _served_certificate(self) -> str:
        """``; it serves ...`` describing the unverified certificate, for the FAIL line."""
        assert self.host is not None and self.port is not None
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            der = _handshake(context, self.host, self.port, self.options.timeout)
            cert = x509.load_der_x509_certificate(der)
        except (OSError, ssl.SSLError, ValueError):
            return ""
        return (
            f"; it serves subject {cert.subject.rfc4514_string()}, issuer "
            f"{cert.issuer.rfc4514_string()}, SAN [{', '.join(subject_alt_names(cert))}], "
            f"valid {cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d}"
        )

    # -- the SuperNode's key ------------------------------------------------------------------

    def check_node_key(self) -> None:
        path = self.options.node_key
        if path is None:
            self._add(
                WARN,
                "node-key",
                "not checked: give --node-key or set FL_NODE_KEY (a SuperLink with SuperNode "
                "authentication, the default, refuses a node without one: code 2001)",
            )
            return
        try:
            key = serialization.load_ssh_private_key(path.read_bytes(), None)
        except OSError as err:
            self._add(FAIL, "node-key", f"{path}: cannot read it ({err.strerror})")
            return
        except TypeError:
            self._add(
                FAIL, "node-key", f"{path}: has a passphrase; Flower reads it unattended: {_KEYGEN}"
            )
            return
        except (ValueError, UnsupportedAlgorithm) as err:
            self._add(FAIL, "node-key", f"{path}: not an OpenSSH private key ({err}): {_KEYGEN}")
            return
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
            self._add(FAIL, "node-key", f"{path}: a {kind} key, Flower needs ECDSA: {_KEYGEN}")
            return
        public = key.public_key()
        pub_path = path.with_name(path.name + ".pub")
        curve = key.curve.name
        if not isinstance(key.curve, ec.SECP384R1):
            self._add(
                WARN if curve in _NIST_CURVES else FAIL,
                "node-key",
                f"{path}: ECDSA on {curve}; the deployment uses P-384 (secp384r1): {_KEYGEN}",
            )
        elif not pub_path.is_file():
            self._add(
                WARN,
                "node-key",
                f"{path}: ECDSA P-384, but no {pub_path.name} beside it (the file to register): "
                f"ssh-keygen -y -f {path} > {pub_path}",
            )
        else:
            try:
                on_disk = serialization.load_ssh_public_key(pub_path.read_bytes())
            except (ValueError, UnsupportedAlgorithm):
                on_disk = None
            if on_disk != public:
                self._add(
                    FAIL,
                    "node-key",
                    f"{pub_path} is not the public half of {path}: registering it would not "
                    f"admit this node; regenerate it: ssh-keygen -y -f {path} > {pub_path}",
                )
                return
            self._add(OK, "node-key", f"{path}: ECDSA P-384, {pub_path.name} matches")
        self.node_public_key = public

    def check_registration(self) -> None:
        if self.node_public_key is None or not self.options.check_registration:
            return
        how = (
            "on the server host: FLWR_HOME=$FL_STATE_DIR/flwr-home flwr supernode list sigmax "
            "lists node ids (not keys); a SuperNode whose key is unknown logs [code: 2004]"
        )
        if not self.tls_ok:
            self._add(WARN, "node-key-registered", f"not checked (no verified TLS link): {how}")
            return
        try:
            keys = registered_keys(f"{self.host}:{self.port}", self.options.ca_cert)
        except Exception as err:  # any Flower-side failure becomes a WARN
            self._add(WARN, "node-key-registered", f"could not list nodes ({_reason(err)}): {how}")
            return
        mine = self.node_public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        match = [(node_id, status) for node_id, status, key in keys if key == mine]
        if match:
            node_id, status = match[0]
            self._add(OK, "node-key-registered", f"registered as node {node_id} (status {status})")
            return
        self._add(
            FAIL,
            "node-key-registered",
            f"the SuperLink holds {len(keys)} key(s), not this one: it refuses this SuperNode "
            "with [code: 2004]. Register it on the server: flwr supernode register "
            f"{self.options.node_key}.pub sigmax (or add it to FL_AUTHORIZED_KEYS)",
        )

    # -- data and memory ----------------------------------------------------------------------

    def settings(self) -> Any:
        from sigmax_fl.deploy.env import app_config
        from sigmax_fl.paths import project_root
        from sigmax_fl.settings import Settings

        root = project_root()
        base = app_config(root) if root is not None else {}
        return Settings.from_run_config({**base, **self.options.run_config})

    def check_data(self) -> Any:
        try:
            settings = self.settings()
        except ValueError as err:
            self._add(FAIL, "run-config", str(err))
            return None
        spec = self.options.data_source
        if spec is None:
            self._add(WARN, "data", "not checked: give --data-source or set DATA_SOURCE")
            return settings
        status, detail, rows = check_data(spec, settings, self.options.data_dir)
        self.train_rows = rows
        self._add(status, "data", detail)
        return settings

    def check_memory(self, settings: Any) -> None:
        if settings is None:
            return
        available = self.options.memory_available
        if available is None:
            available = mem_available()
        if available is None:
            self._add(WARN, "memory", "not checked: /proc/meminfo has no MemAvailable")
            return
        rows = self.train_rows or 0
        status, detail = check_memory(settings, rows, available)
        self._add(status, "memory", detail)


_KEYGEN = "make one with ssh-keygen -t ecdsa -b 384 -N '' -f node.key"
_NIST_CURVES = {"secp256r1", "secp384r1", "secp521r1"}


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or getattr(err, "reason", None) or str(err)
    return " ".join(str(text).split()) or type(err).__name__


def _handshake(context: ssl.SSLContext, host: str, port: int, timeout: float) -> bytes:
    """Connect, complete the TLS handshake and return the served certificate (DER)."""
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ssl.SSLError("the server sent no certificate")
    return der


# -- TLS file checks, usable on their own ------------------------------------------------------


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """``DNS:name`` / ``IP:addr`` entries of the certificate's subjectAltName."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [f"DNS:{n}" for n in sans.get_values_for_type(x509.DNSName)] + [
        f"IP:{ip}" for ip in sans.get_values_for_type(x509.IPAddress)
    ]


def verify_chain(
    chain: list[x509.Certificate], ca_path: Path, now: datetime.datetime | None = None
) -> tuple[str, str]:
    """Check that the CA at ``ca_path`` verifies ``chain`` (leaf first, then intermediates).

    Each certificate must be within its validity dates and signed by the next one, the
    last by a certificate of the CA file; a CA certificate must itself be valid today.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        roots = x509.load_pem_x509_certificates(ca_path.read_bytes())
    except (OSError, ValueError) as err:
        return FAIL, f"cannot load the CA {ca_path}: {_reason(err)}"
    for cert in [*chain, *roots]:
        if now < cert.not_valid_before_utc:
            start = f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
            return FAIL, f"{_who(cert)} is not valid before {start} UTC: check this host's clock"
        if now > cert.not_valid_after_utc:
            end = f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}"
            return FAIL, f"{_who(cert)} expired on {end} UTC: reissue it"
    for child, parent in itertools.pairwise(chain):
        if not _signed_by(child, parent):
            return FAIL, f"{_who(child)} is not signed by the next certificate in the file"
    last = chain[-1]
    if any(_signed_by(last, root) for root in roots):
        days = (chain[0].not_valid_after_utc - now).days
        status = WARN if days < 7 else OK
        return status, f"signed by the CA {ca_path.name}, valid for {days} more day(s)"
    return FAIL, (
        f"{_who(last)} (issuer {last.issuer.rfc4514_string()}) is not signed by the CA "
        f"{ca_path} ({', '.join(r.subject.rfc4514_string() for r in roots)}): clients that "
        "trust this CA refuse the SuperLink; use the CA that issued it, or reissue it"
    )


def _who(cert: x509.Certificate) -> str:
    return f"certificate '{cert.subject.rfc4514_string()}'"


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def key_matches(key_path: Path, cert: x509.Certificate) -> tuple[str, str]:
    """Check that the PEM private key at ``key_path`` is the key of ``cert``."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except OSError as err:
        return FAIL, f"cannot read it ({err.strerror})"
    except TypeError:
        return FAIL, "encrypted; the SuperLink needs an unencrypted PEM key"
    except (ValueError, UnsupportedAlgorithm) as err:
        return FAIL, f"not a PEM private key ({_reason(err)})"
    if key.public_key() != cert.public_key():
        return FAIL, (
            "does not belong to the SuperLink certificate (a key from another pair): the "
            "SuperLink cannot complete TLS; use the key the certificate was issued for"
        )
    return OK, "matches the SuperLink certificate"


# -- registration ------------------------------------------------------------------------------


def registered_keys(address: str, ca_cert: Path | None) -> list[tuple[int, str, bytes]]:
    """(node id, status, PEM public key) of every SuperNode the SuperLink knows.

    ``flwr supernode list`` prints node ids and status but not keys, so this asks the
    Control API the same question through Flower's own client, with a throwaway
    ``FLWR_HOME`` so no user configuration or token is read or written.
    """
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest

    previous = os.environ.get("FLWR_HOME")
    with tempfile.TemporaryDirectory(prefix="flwr-home-doctor-") as home:
        os.environ["FLWR_HOME"] = home
        try:
            connection = SuperLinkConnection(
                name="doctor",
                address=address,
                root_certificates=None if ca_cert is None else str(ca_cert.resolve()),
                insecure=ca_cert is None,
            )
            # Flower prints "Using SuperLink: ..." to stdout: not one of the doctor's lines.
            with contextlib.redirect_stdout(io.StringIO()):
                client = init_http_client_from_connection(connection)
            try:
                response = client.ListNodes(ListNodesRequest())
            finally:
                client.close()
        finally:
            if previous is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = previous
    return [
        (int(n.node_id), str(n.status), bytes(n.public_key))
        for n in response.nodes_info
        if n.status != "unregistered"
    ]


# -- data --------------------------------------------------------------------------------------


def check_data(spec: str, settings: Any, data_dir: str = "") -> tuple[str, str, int | None]:
    """Load ``spec`` as the ClientApp would (strict policy) and count rows per split.

    Returns ``(status, detail, training rows or None)``.
    """
    from sigmax_fl.data import DataError, load_ohlcv, resolve_source
    from sigmax_fl.dataset import ARRAYS_SUFFIX, load_arrays
    from sigmax_fl.features import FEATURE_NAMES, Calendar, make_features

    try:
        source = resolve_source(spec, data_dir or settings.data_dir)
    except DataError as err:
        return FAIL, " ".join(str(err).split()), None
    if source.path.endswith(ARRAYS_SUFFIX):
        try:
            data = load_arrays(source)
        except (OSError, ValueError) as err:
            return FAIL, f"{source.path}: {_reason(err)}", None
        width = data.X("train").shape[1] if data.X("train").ndim == 2 else 0
        if width != len(FEATURE_NAMES):
            return FAIL, f"{source.path}: X_train has {width} columns, the model takes 50", None
        rows = data.rows("train")
        return _rows_verdict(source.path, rows, data.rows("val"), "ready arrays")
    # The loader logs gaps at INFO through Flower's logger: not one of the doctor's lines.
    quiet = logging.getLogger("flwr")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        bars = load_ohlcv(source.path, policy="strict")
        X, _ = make_features(bars, settings.horizon, max_gap=settings.max_gap)
    except DataError as err:
        return FAIL, f"{' '.join(str(err).split())} (data-policy 'repair' would drop it)", None
    except (OSError, ValueError) as err:
        return FAIL, f"{source.path}: {_reason(err)}", None
    finally:
        quiet.setLevel(level)
    if list(X.columns) != list(FEATURE_NAMES):
        return FAIL, f"{source.path}: {X.shape[1]} features, expected 50", None
    calendar = Calendar.from_strings(settings.train_end, settings.val_end, settings.horizon)
    split = calendar.split(X.index)
    span = f"{len(bars)} bars {bars.index[0].date()} .. {bars.index[-1].date()}, 50 features"
    return _rows_verdict(
        source.path,
        len(split["train"]),
        len(split["val"]),
        span,
        test=len(split["test"]),
        calendar=(settings.train_end, settings.val_end),
    )


def _rows_verdict(
    path: str,
    train: int,
    val: int,
    what: str,
    test: int | None = None,
    calendar: tuple[str, str] | None = None,
) -> tuple[str, str, int]:
    counts = f"train {train}, val {val}" + ("" if test is None else f", test {test}")
    where = "" if calendar is None else f" (train-end {calendar[0]}, val-end {calendar[1]})"
    if train == 0 or val == 0:
        empty = "training" if train == 0 else "validation"
        return (
            FAIL,
            (
                f"{path}: {what}; rows {counts}{where}: no {empty} rows, the ClientApp would "
                "fail: the file must cover the shared calendar, or change train-end / val-end"
            ),
            train,
        )
    if train < MIN_TRAIN_ROWS:
        return (
            WARN,
            (
                f"{path}: {what}; rows {counts}{where}: fewer than {MIN_TRAIN_ROWS} training "
                "rows, little for the model to learn from"
            ),
            train,
        )
    return OK, f"{path}: {what}; rows {counts}{where}", train


# -- memory ------------------------------------------------------------------------------------


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` in bytes, or None where there is no such line."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@functools.cache
def _runtime_bytes() -> int:
    """Resident memory of this process once torch is imported: a ClientApp's floor.

    Measured once, so repeated estimates in one process agree.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        return RUNTIME_BYTES
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return RUNTIME_BYTES


def training_memory(settings: Any, train_rows: int, batch_size: int | None = None) -> dict:
    """Bytes a ClientApp needs to train, by part (float32 throughout, as ``task.train``).

    * parameters, gradients and the optimiser state (Adam: two moments; SGD: momentum);
    * activations of one mini-batch: every layer's input and output kept for backward,
      and their gradients;
    * the instance's arrays: 50 float32 features and a target per row (train, val, test
      alike, here taken as 1.5x the training rows), plus the float64 feature frame the
      build holds while featurising;
    * the process itself (Python, torch), measured here after importing torch.
    """
    from sigmax_fl.model import build_model

    batch = settings.batch_size if batch_size is None else batch_size
    model = build_model(settings.model)
    params = sum(p.numel() for p in model.parameters())
    widths = [m.in_features + m.out_features for m in model.modules() if hasattr(m, "in_features")]
    f32 = 4
    states = 2 if settings.optimizer == "adam" else 1
    rows = int(train_rows * 1.5)
    return {
        "parameters": params * f32,
        "gradients": params * f32,
        "optimizer": states * params * f32,
        "activations": 2 * batch * sum(widths) * f32,
        "features": rows * (50 + 1) * f32 + rows * 50 * 8,
        "runtime": _runtime_bytes(),
    }


def check_memory(
    settings: Any, train_rows: int, available: int, fraction: float = MEMORY_FRACTION
) -> tuple[str, str]:
    """WARN when the estimate exceeds ``fraction`` of ``available``.

    The advice names a batch size that would fit, if activations are what is too big.
    """
    parts = training_memory(settings, train_rows)
    total = sum(parts.values())
    mib = 2**20
    shown = ", ".join(f"{k} {v / mib:.1f}" for k, v in parts.items())
    detail = (
        f"batch-size {settings.batch_size}: about {total / mib:.0f} MiB ({shown} MiB) of "
        f"{available / mib:.0f} MiB available"
    )
    budget = fraction * available
    if total <= budget:
        return OK, detail
    fixed = total - parts["activations"]
    per_row = parts["activations"] / settings.batch_size
    fits = int((budget - fixed) // per_row) if budget > fixed else 0
    if fits >= 1:
        advice = f"lower batch-size to {min(fits, settings.batch_size - 1)} or less"
    else:
        advice = (
            "no batch size fits: the process and the instance's arrays alone exceed it; "
            "free memory on this host or train on a shorter file"
        )
    return WARN, f"{detail}: above {fraction:.0%} of it; {advice}"


def run(options: DoctorOptions, emit: Callable[[Check], None] | None = None) -> list[Check]:
    """Run every check; ``emit`` receives each line as it is decided."""
    return Doctor(options, emit).run()
