"""The node service with a certificate the operator provides (signed by their own CA) instead of the plane's."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from pathlib import Path

import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.config import Config
from server.nodes.tls import NodeTLS, load_or_create
from tests.conftest import RunningPlane, eventually
from tests.support.agent_process import DEMO_MODEL, AgentProcess, describe
from tests.support.served_nodes import QUESTION


def _certificate(
    subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture
def plane_config(plane_config: Config, tmp_path: Path) -> Config:
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Example Corp CA", "Example Corp CA", ca_key, ca_key, ca=True)
    leaf = _certificate("plane.example", "Example Corp CA", leaf_key, ca_key, ca=False)
    cert, key = tmp_path / "plane.pem", tmp_path / "plane.key"
    cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return plane_config.replace(grpc_tls_cert=str(cert), grpc_tls_key=str(key), node_heartbeat_s=0.5)


def test_an_agent_enrolls_and_serves_through_an_operator_certificate(plane: RunningPlane, tmp_path: Path) -> None:
    plane.create_org("acme")
    key = plane.create_key("acme")
    token = str(plane.admin.post("/node-tokens", {"org": "acme"})["token"])
    agent = AgentProcess(tmp_path, "corp-node")
    try:
        result = agent.enroll(f"127.0.0.1:{plane.server.plane.grpc_port}", token)
        assert result.returncode == 0, describe(result)
        agent.start()
        registry = plane.server.plane.registry
        eventually(lambda: bool(registry.sessions), what=f"the agent to connect:\n{agent.output}")
        with openai.OpenAI(base_url=plane.v1, api_key=key, max_retries=0) as client:
            answer = client.chat.completions.create(model=DEMO_MODEL, messages=QUESTION, temperature=0)
        assert "Paris" in (answer.choices[0].message.content or "")
    finally:
        agent.stop()


def test_the_fingerprint_is_the_leafs_whatever_else_the_file_holds() -> None:
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Example Corp CA", "Example Corp CA", ca_key, ca_key, ca=True)
    leaf = _certificate("plane.example", "Example Corp CA", leaf_key, ca_key, ca=False)
    # openssl's exports put a subject line before each certificate.
    pem = b"subject=CN = plane.example\n" + leaf.public_bytes(serialization.Encoding.PEM)
    pem += b"subject=CN = Example Corp CA\n" + ca.public_bytes(serialization.Encoding.PEM)
    expected = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert NodeTLS(pem, b"").fingerprint == expected


def test_the_planes_own_certificate_keeps_its_fingerprint_across_restarts(tmp_path: Path) -> None:
    created = load_or_create(tmp_path)
    der = x509.load_pem_x509_certificate(created.cert_pem).public_bytes(serialization.Encoding.DER)
    assert load_or_create(tmp_path).fingerprint == created.fingerprint == hashlib.sha256(der).hexdigest()
