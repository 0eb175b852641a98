"""``sigmax-fl doctor`` against real files and a real TLS port (no mocks).

The SuperLink is stood in for by a Python ``ssl`` server on a free loopback port serving the
certificate under test: the doctor's handshake is the same TLS a SuperNode performs. Each
broken input must turn its check into FAIL; in particular a certificate from another CA
(the issue's "a doctor that passes a wrong certificate").
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from sigmax_fl.cli import main
from sigmax_fl.data import load_ohlcv
from sigmax_fl.deploy.credentials import Credentials, ensure_credentials
from sigmax_fl.deploy.processes import free_port
from sigmax_fl.doctor import FAIL, OK, WARN, Check, DoctorOptions, run
from sigmax_fl.settings import Settings

DATA = Path(__file__).resolve().parents[1] / "data"
FL_VARIABLES = (
    "FL_SERVER",
    "FL_CA_CERT",
    "FL_SERVER_CERT",
    "FL_SERVER_KEY",
    "FL_NODE_KEY",
    "DATA_SOURCE",
)


class TLSServer:
    """Accepts connections on 127.0.0.1 and completes a TLS handshake with ``cert``/``key``."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(2.0)
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass  # the client refused our certificate, or only probed the port
            finally:
                conn.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2.0)
        self.sock.close()


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return ensure_credentials(tmp_path_factory.mktemp("creds"), ["desk-a"])


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    """A complete, valid set from a different CA (same SAN, its own key)."""
    return ensure_credentials(tmp_path_factory.mktemp("other-ca"), [])


@pytest.fixture(scope="module")
def server(creds: Credentials) -> Iterator[TLSServer]:
    srv = TLSServer(creds.server_cert, creds.server_key)
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _no_fl_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def options(creds: Credentials, address: str, **changes: object) -> DoctorOptions:
    base = DoctorOptions(
        superlink=address,
        ca_cert=creds.ca_cert,
        server_cert=creds.server_cert,
        server_key=creds.server_key,
        node_key=creds.nodes["desk-a"].private_key,
        data_source=None,
        check_registration=False,
        memory_available=64 * 2**30,
    )
    return replace(base, **changes)


def by_name(results: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in results}


def test_all_ok_with_generated_credentials_and_a_live_tls_port(
    creds: Credentials, server: TLSServer
) -> None:
    results = run(options(creds, server.address, data_source="coinbase-btc-usd-1d"))
    checks = by_name(results)
    # The kernel check is OK where this host has a C compiler (CI's has), a WARN otherwise
    kernel = OK if shutil.which("cc") else WARN
    expected = [kernel if c.name == "aggregation-kernel" else OK for c in results]
    assert [c.status for c in results] == expected, "\n".join(map(str, results))
    assert set(checks) == {
        "superlink-address",
        "superlink-port",
        "server-cert-chain",
        "server-cert-san",
        "server-key",
        "aggregation-kernel",
        "tls-handshake",
        "node-key",
        "data",
        "memory",
    }
    assert "train 1339" in checks["data"].detail and "50 features" in checks["data"].detail
    for check in results:
        assert str(check).startswith(f"OK {check.name}: ") and "\n" not in str(check)


def test_aggregation_kernel_warns_without_a_compiler(
    creds: Credentials, server: TLSServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-sigmax")
    check = by_name(run(options(creds, server.address)))["aggregation-kernel"]
    assert check.status == WARN
    assert "no C compiler 'no-such-compiler-sigmax'" in check.detail
    assert "torch pass" in check.detail


def test_aggregation_kernel_is_checked_on_the_server_host_only(
    creds: Credentials, server: TLSServer
) -> None:
    checks = by_name(run(options(creds, server.address, server_cert=None, server_key=None)))
    assert "aggregation-kernel" not in checks
    assert "tls-handshake" in checks


def test_certificate_from_another_ca_fails(
    creds: Credentials, other_ca: Credentials, tmp_path: Path
) -> None:
    """The wrong certificate fails both offline (chain) and on the wire (handshake)."""
    wrong = TLSServer(other_ca.server_cert, other_ca.server_key)
    try:
        results = run(
            options(
                creds,
                wrong.address,
                server_cert=other_ca.server_cert,
                server_key=other_ca.server_key,
            )
        )
    finally:
        wrong.close()
    checks = by_name(results)
    assert checks["server-cert-chain"].status == FAIL
    assert "not signed by the CA" in checks["server-cert-chain"].detail
    assert checks["tls-handshake"].status == FAIL
    assert "unable to get local issuer certificate" in checks["tls-handshake"].detail
    # Its SAN and key pair are fine: only the chain is wrong.
    assert checks["server-cert-san"].status == OK and checks["server-key"].status == OK


def test_san_that_does_not_cover_the_dialled_host_fails(creds: Credentials, tmp_path: Path) -> None:
    # The same CA (reused while valid), a certificate only for fl.example.internal.
    for name in ("ca.crt", "ca.key"):
        (tmp_path / name).write_bytes((creds.ca_cert.parent / name).read_bytes())
    narrow = ensure_credentials(tmp_path, [], hosts=("fl.example.internal",))
    assert narrow.ca_cert.read_bytes() == creds.ca_cert.read_bytes()
    srv = TLSServer(narrow.server_cert, narrow.server_key)
    try:
        results = run(
            options(
                creds, srv.address, server_cert=narrow.server_cert, server_key=narrow.server_key
            )
        )
    finally:
        srv.close()
    checks = by_name(results)
    assert checks["server-cert-chain"].status == OK
    assert checks["server-cert-san"].status == FAIL
    assert "lacks 127.0.0.1" in checks["server-cert-san"].detail
    assert checks["tls-handshake"].status == FAIL
    assert "mismatch" in checks["tls-handshake"].detail.lower()


def test_key_of_another_certificate_fails(
    creds: Credentials, other_ca: Credentials, server: TLSServer
) -> None:
    checks = by_name(run(options(creds, server.address, server_key=other_ca.server_key)))
    assert checks["server-key"].status == FAIL
    assert "does not belong" in checks["server-key"].detail
    assert checks["server-cert-chain"].status == OK


def _expired_certificate(creds: Credentials, folder: Path) -> tuple[Path, Path]:
    """A SuperLink certificate from the right CA, right SAN, that expired yesterday."""
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    cert_path, key_path = folder / "expired.crt", folder / "expired.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_expired_certificate_fails(creds: Credentials, tmp_path: Path) -> None:
    cert, key = _expired_certificate(creds, tmp_path)
    srv = TLSServer(cert, key)
    try:
        checks = by_name(run(options(creds, srv.address, server_cert=cert, server_key=key)))
    finally:
        srv.close()
    assert checks["server-cert-chain"].status == FAIL
    assert "expired on" in checks["server-cert-chain"].detail
    assert checks["tls-handshake"].status == FAIL
    assert "expired" in checks["tls-handshake"].detail
    assert checks["server-key"].status == OK and checks["server-cert-san"].status == OK


def test_closed_port_fails_and_the_command_exits_1(
    creds: Credentials, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # free a moment ago, and nobody listens on it
    status = main(
        [
            "doctor",
            "--superlink",
            f"127.0.0.1:{port}",
            "--ca-cert",
            str(creds.ca_cert),
            "--node-key",
            str(creds.nodes["desk-a"].private_key),
            "--timeout",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert status == 1
    lines = out.splitlines()
    assert f"FAIL superlink-port: 127.0.0.1:{port}: Connection refused" in out
    assert all(line.split(" ", 1)[0] in (OK, WARN, FAIL) for line in lines), out
    # Nothing to shake hands with, so no handshake line; the node key is still checked.
    assert not any("tls-handshake" in line for line in lines)
    assert any(line.startswith("OK node-key:") for line in lines)


def test_unresolvable_host_fails(creds: Credentials) -> None:
    checks = by_name(run(options(creds, "no-such-host.invalid:8080")))
    assert checks["superlink-address"].status == FAIL
    assert "does not resolve" in checks["superlink-address"].detail


def test_command_passes_on_a_healthy_setup(
    creds: Credentials, server: TLSServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "doctor",
        "--superlink",
        server.address,
        "--ca-cert",
        str(creds.ca_cert),
        "--server-cert",
        str(creds.server_cert),
        "--server-key",
        str(creds.server_key),
        "--node-key",
        str(creds.nodes["desk-a"].private_key),
        "--no-registration",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "OK tls-handshake" in out and "FAIL" not in out


def _generic_csv(path: Path, corrupt_line: int | None = None) -> Path:
    """The bundled Coinbase daily bars as a generic CSV; optionally one corrupt line."""
    bars = load_ohlcv(DATA / "Coinbase_BTCUSD_d.csv")
    lines = ["timestamp,open,high,low,close,volume"] + [
        f"{t:%Y-%m-%d %H:%M:%S},{r.open},{r.high},{r.low},{r.close},{r.volume}"
        for t, r in zip(bars.index, bars.itertuples(), strict=True)
    ]
    if corrupt_line is not None:
        fields = lines[corrupt_line - 1].split(",")
        fields[4] = "abc"  # close
        lines[corrupt_line - 1] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_file_ok_corrupt_row_named_and_calendar(creds: Credentials, tmp_path: Path) -> None:
    good = _generic_csv(tmp_path / "good.csv")
    checks = by_name(run(options(creds, None, node_key=None, data_source=str(good))))
    assert checks["data"].status == OK, checks["data"]

    bad = _generic_csv(tmp_path / "bad.csv", corrupt_line=500)
    checks = by_name(run(options(creds, None, node_key=None, data_source=str(bad))))
    assert checks["data"].status == FAIL
    detail = checks["data"].detail
    assert str(bad) in detail and "row 500" in detail and "field 'close'" in detail

    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"\x00\x01\x02 not a csv \xff\xfe\n")
    assert (
        by_name(run(options(creds, None, node_key=None, data_source=str(garbage))))["data"].status
        == FAIL
    )

    # A file that ends before train-end has rows, but none the shared calendar trains on.
    late = run(
        options(
            creds,
            None,
            node_key=None,
            data_source=str(good),
            run_config={"train-end": "2010-01-01", "val-end": "2010-06-30"},
        )
    )
    assert by_name(late)["data"].status == FAIL
    assert "no training rows" in by_name(late)["data"].detail


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "p256", "pub-mismatch", "garbage"])
def test_wrong_node_key_fails(creds: Credentials, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "node.key"
    ssh = serialization.PrivateFormat.OpenSSH
    keys = {
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "rsa": lambda: rsa.generate_private_key(65537, 2048),
        "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "pub-mismatch": lambda: ec.generate_private_key(ec.SECP384R1()),
    }
    if kind == "garbage":
        path.write_text("not a key\n")
    else:
        key = keys[kind]()
        path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, ssh, serialization.NoEncryption())
        )
        other = ec.generate_private_key(ec.SECP384R1()) if kind == "pub-mismatch" else key
        (tmp_path / "node.key.pub").write_bytes(
            other.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
        )
    check = by_name(run(options(creds, None, node_key=path)))["node-key"]
    # P-256 is a NIST curve Flower accepts, so it is a WARN (the deployment uses P-384).
    assert check.status == (WARN if kind == "p256" else FAIL), check
    if kind in ("ed25519", "rsa"):
        assert "needs ECDSA" in check.detail and "ssh-keygen -t ecdsa -b 384" in check.detail


def test_memory_warns_and_suggests_a_smaller_batch(creds: Credentials) -> None:
    from sigmax_fl.doctor import check_memory, training_memory

    settings = Settings(batch_size=100_000)
    parts = training_memory(settings, 1339)
    fixed = sum(parts.values()) - parts["activations"]
    # Enough for everything but this batch's activations, at the default 50 % fraction.
    available = int(2 * (fixed + parts["activations"] / 4))
    status, detail = check_memory(settings, 1339, available)
    assert status == WARN and "lower batch-size to" in detail
    suggested = int(detail.split("lower batch-size to ")[1].split()[0])
    assert 0 < suggested < 100_000
    assert check_memory(replace(settings, batch_size=suggested), 1339, available)[0] == OK
    for word in ("accumulation", "mixed precision", "precision"):
        assert word not in detail
    assert check_memory(Settings(), 1339, 64 * 2**30)[0] == OK
    assert check_memory(Settings(), 1339, 10 * 2**20)[0] == WARN
