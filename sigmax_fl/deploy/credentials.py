"""Throwaway TLS and SuperNode-authentication credentials for a local federation.

A local deployment needs three kinds of secrets, and Flower 1.42 reads each in a
fixed format:

* a certificate authority (``ca.crt``, ``ca.key``): the SuperLink is started with
  ``--ssl-ca-certfile`` and every client (SuperNodes, the ``flwr`` CLI, the
  SuperExec the SuperLink spawns itself) verifies the SuperLink against it;
* a SuperLink server certificate (``superlink.crt``, ``superlink.key``) signed by
  that CA, with subjectAltName ``DNS:localhost`` and ``IP:127.0.0.1`` because
  clients connect to ``127.0.0.1`` and TLS checks the SAN, not the common name;
* one ECDSA P-384 key pair per SuperNode in OpenSSH format
  (``supernode-NAME.key`` and ``supernode-NAME.key.pub``): ``flower-supernode
  --auth-supernode-private-key`` parses the private key with
  ``load_ssh_private_key`` and ``flwr supernode register`` parses the public key
  with ``load_ssh_public_key``, both requiring a NIST elliptic curve.

The files are regenerated only when missing or invalid, so repeated deployments
reuse the registered node keys stored in the SuperLink's database.

``python -m sigmax_fl.deploy.credentials FOLDER --host NAME --node NAME`` writes the
same files for containers and clusters, where the SuperLink is reached by a service
name (``fl-server``) that the certificate must name too.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sigmax_fl.paths import PRIVATE, make_folders, write_durably

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
"""Names the SuperLink certificate is valid for when none are given."""

CERT_VALIDITY = datetime.timedelta(days=30)
"""Lifetime of generated certificates: long enough for a session, short as throwaways."""

RENEW_BEFORE = datetime.timedelta(days=1)
"""A certificate expiring sooner than this is regenerated instead of reused."""

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class NodeKey:
    """Paths of one SuperNode's authentication key pair.

    Attributes
    ----------
    private_key : Path
        OpenSSH private key, for ``flower-supernode --auth-supernode-private-key``.
    public_key : Path
        OpenSSH public key (``ecdsa-sha2-nistp384 ...``), for
        ``flwr supernode register``.
    """

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class ServerCertificates:
    """The three PEM files a TLS SuperLink needs, from any PKI (no CA key required).

    Attributes
    ----------
    ca_cert : Path
        CA certificate (``--ssl-ca-certfile``; clients verify the SuperLink with it).
    server_cert : Path
        SuperLink certificate (``--ssl-certfile``).
    server_key : Path
        SuperLink private key (``--ssl-keyfile``).
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class Credentials:
    """Paths of every credential file of a local deployment.

    Attributes
    ----------
    ca_cert : Path
        PEM CA certificate: ``--ssl-ca-certfile`` of the SuperLink,
        ``--root-certificates`` of SuperNodes and of the CLI connection.
    ca_key : Path
        PEM private key of the CA, kept so the server certificate can be renewed.
    server_cert : Path
        PEM SuperLink certificate (``--ssl-certfile``).
    server_key : Path
        PEM SuperLink private key (``--ssl-keyfile``).
    nodes : dict[str, NodeKey]
        One authentication key pair per SuperNode name.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    nodes: dict[str, NodeKey]


def ensure_credentials(
    folder: Path,
    node_names: Iterable[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
) -> Credentials:
    """Create, or reuse when still valid, the credentials of a local deployment.

    Parameters
    ----------
    folder : Path
        Git-ignored directory that holds the files; created if missing.
    node_names : Iterable[str]
        One name per SuperNode (letters, digits, ``_``, ``.``, ``-``); each gets
        its own key pair so it can be registered and refused individually.
    hosts : Sequence[str]
        DNS names or IP addresses the SuperLink certificate must be valid for.

    Returns
    -------
    Credentials
        The absolute paths, ready to be passed to Flower's flags.

    Raises
    ------
    ValueError
        If a node name is not usable as a file name.
    """
    folder = folder.expanduser().resolve()
    make_folders(folder)
    names = list(node_names)
    for name in names:
        if not _NODE_NAME.match(name):
            raise ValueError(
                f"SuperNode name {name!r} must match {_NODE_NAME.pattern} (it becomes a file name)"
            )

    ca_cert, ca_key = folder / "ca.crt", folder / "ca.key"
    server_cert, server_key = folder / "superlink.crt", folder / "superlink.key"

    ca = _load_valid_ca(ca_cert, ca_key)
    if ca is None:
        ca = _write_ca(ca_cert, ca_key)
    if not _server_cert_is_valid(server_cert, server_key, ca[0], hosts):
        _write_server_cert(server_cert, server_key, ca, hosts)

    nodes = {}
    for name in names:
        key = NodeKey(folder / f"supernode-{name}.key", folder / f"supernode-{name}.key.pub")
        if not _node_key_is_valid(key):
            write_node_key(key.private_key)
        nodes[name] = key
    return Credentials(ca_cert, ca_key, server_cert, server_key, nodes)


def write_node_key(private_key_path: Path) -> NodeKey:
    """Generate an ECDSA P-384 key pair in OpenSSH format.

    Equivalent to ``ssh-keygen -t ecdsa -b 384 -N "" -f PATH``; used directly by
    tests that need a key the SuperLink has never seen.

    Parameters
    ----------
    private_key_path : Path
        Where the private key goes; the public key is written next to it with the
        suffix ``.pub`` appended.

    Returns
    -------
    NodeKey
        Both paths.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_path = private_key_path.with_name(private_key_path.name + ".pub")
    _write_private(private_key_path, private_pem)
    _write_atomic(public_path, public_line + b"\n", 0o644)
    return NodeKey(private_key_path, public_path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a key or certificate durably, with ``mode`` before the umask.

    Through :func:`~sigmax_fl.paths.write_durably`: a crash never leaves half a key behind, a
    power cut never an empty one, and two processes writing the same file never mix.
    """
    write_durably(path, lambda handle: handle.write(data), mode)


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, PRIVATE)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _fresh(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > RENEW_BEFORE


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return cert.public_key() == key.public_key()


def _load_pair(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """Load a certificate and its EC key, or None if either is missing or unreadable."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    return cert, key


def _load_valid_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    pair = _load_pair(cert_path, key_path)
    if pair is None:
        return None
    cert, key = pair
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return None
    return pair if is_ca and _fresh(cert) and _same_key(cert, key) else None


_KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage allowing only the named uses: each certificate may do its one job."""
    return x509.KeyUsage(**{use: allowed.get(use, False) for use in _KEY_USAGES})


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """Sign a certificate valid from 5 minutes ago (clock skew) for ``CERT_VALIDITY``."""
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
    )
    for extension, critical in (
        *extensions,
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
    ):
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA384())


def _write_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sigmax-fl local CA")])
    extensions = [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_key_usage(key_cert_sign=True, crl_sign=True), True),
    ]
    cert = _certificate(name, name, key.public_key(), key, extensions)
    _write_private(key_path, _private_pem(key))
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def names_host(cert: x509.Certificate, host: str) -> bool:
    """True if the subjectAltName covers ``host`` as TLS clients match it.

    An IP address or a DNS name, a leading ``*.`` matching one label; never the common name.
    """
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in sans.get_values_for_type(x509.IPAddress)
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    for name in (n.lower().rstrip(".") for n in sans.get_values_for_type(x509.DNSName)):
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def _server_cert_is_valid(
    cert_path: Path, key_path: Path, ca_cert: x509.Certificate, hosts: Sequence[str]
) -> bool:
    """True if the server certificate is signed by this CA, fresh and covers ``hosts``."""
    pair = _load_pair(cert_path, key_path)
    if pair is None:
        return False
    cert, key = pair
    try:
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    wanted = set(_subject_alt_names(hosts))
    return wanted <= set(sans) and _fresh(cert) and _same_key(cert, key)


def _write_server_cert(
    cert_path: Path,
    key_path: Path,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    hosts: Sequence[str],
) -> None:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    extensions = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.SubjectAlternativeName(_subject_alt_names(hosts)), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (_key_usage(digital_signature=True, key_agreement=True), True),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ]
    cert = _certificate(subject, ca_cert.subject, key.public_key(), ca_key, extensions)
    _write_private(key_path, _private_pem(key))
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _node_key_is_valid(key: NodeKey) -> bool:
    """True if both files exist, hold P-384 keys, and the public key matches."""
    try:
        private = serialization.load_ssh_private_key(key.private_key.read_bytes(), None)
        public = serialization.load_ssh_public_key(key.public_key.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm):
        return False
    return (
        isinstance(private, ec.EllipticCurvePrivateKey)
        and isinstance(private.curve, ec.SECP384R1)
        and private.public_key() == public
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Write a CA, a SuperLink certificate and SuperNode keys for a deployment.

    Loopback names are always included in the certificate: the SuperLink's own
    SuperExec and the ``flwr`` CLI beside it connect over loopback even when the
    SuperLink listens on ``0.0.0.0``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m sigmax_fl.deploy.credentials",
        description="Create (or reuse while valid) TLS and SuperNode-authentication files.",
    )
    parser.add_argument("folder", type=Path, help="where the files go (keep it out of git)")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP clients use to reach the SuperLink (repeatable)",
    )
    parser.add_argument(
        "--node", action="append", default=[], help="a SuperNode name; one key pair each"
    )
    args = parser.parse_args(argv)
    hosts = list(dict.fromkeys([*args.host, *DEFAULT_HOSTS]))
    try:
        creds = ensure_credentials(args.folder, args.node, hosts)
    except ValueError as err:
        parser.error(str(err))
    print(f"FL_CA_CERT={creds.ca_cert}")
    print(f"FL_SERVER_CERT={creds.server_cert}  (valid for {', '.join(hosts)})")
    print(f"FL_SERVER_KEY={creds.server_key}")
    for name, key in creds.nodes.items():
        print(f"SuperNode {name}: FL_NODE_KEY={key.private_key}, public key {key.public_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
