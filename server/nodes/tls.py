"""The node service's TLS identity: a self-signed certificate the plane creates in its data dir, or the
certificate and key the operator provides.

Agents pin the certificate the plane presents by the SHA-256 fingerprint carried in their enrollment token, then
trust exactly it. The plane's own certificate names `hatchway-plane`, which agents verify instead of the address
they dialled, so a plane reached by IP, through NAT or under another DNS name needs no re-issued certificate; an
operator's certificate is checked against the address the agent dials, as usual.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from proto.contract import PLANE_TLS_NAME, certificate_fingerprint

# cryptography is imported only where a certificate is made or an operator's is checked: a plane that restarts on
# its own certificate (and decrypts no provider key, see server.credentials) never loads it (its size: bench/README.md).

VALIDITY = datetime.timedelta(days=3650)
# The first certificate of a PEM file (the leaf, when it holds a chain), wherever the file's text puts it.
FIRST_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class NodeTLS:
    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        """Of the leaf: the certificate a TLS handshake shows the agent."""
        leaf = FIRST_CERTIFICATE.search(self.cert_pem)
        if leaf is None:
            raise ValueError("the node service certificate holds no PEM certificate")
        return certificate_fingerprint(leaf.group())


def load_provided(cert_path: Path, key_path: Path) -> NodeTLS:
    """The operator's certificate (the leaf first, then any intermediates) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        x509.load_pem_x509_certificate(cert_pem)
        serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot use the node service certificate {cert_path} / key {key_path}: {exc}") from exc
    return NodeTLS(cert_pem, key_pem)


def load_or_create(data_dir: Path) -> NodeTLS:
    cert_path, key_path = data_dir / "node-ca.pem", data_dir / "node-ca.key"
    if cert_path.exists() and key_path.exists():
        return NodeTLS(cert_path.read_bytes(), key_path.read_bytes())
    tls = _create()
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(tls.key_pem)
    cert_path.write_bytes(tls.cert_pem)
    return tls


def _create() -> NodeTLS:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PLANE_TLS_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(PLANE_TLS_NAME),
        x509.DNSName("localhost"),
        x509.DNSName(socket.gethostname()),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return NodeTLS(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
