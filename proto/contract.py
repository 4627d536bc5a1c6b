"""The parts of the plane <-> agent contract that are not messages: both sides import them from here.

- An enrollment token is `<secret>.<sha256 of the plane's node CA certificate, hex>`: the agent pins the
  plane's certificate by that fingerprint on first contact (like kubeadm's discovery hash).
- The plane's own node certificate names `hatchway-plane`; agents check that name rather than the address they
  dialled, so NAT, IPs and DNS aliases need no re-issued certificate. A certificate the operator provides
  instead is checked against the address dialled.
- A node authenticates each `Connect` with the metadata `authorization: Bearer <node credential>`.
"""

from __future__ import annotations

import hashlib
import ssl

PLANE_TLS_NAME = "hatchway-plane"
AUTHORIZATION = "authorization"


def join_enrollment_token(secret: str, ca_fingerprint: str) -> str:
    return f"{secret}.{ca_fingerprint}"


def split_enrollment_token(token: str) -> tuple[str, str]:
    """(secret, CA fingerprint); the fingerprint is empty for a token without one."""
    secret, _, fingerprint = token.strip().rpartition(".")
    return (secret, fingerprint) if secret else (token.strip(), "")


def certificate_fingerprint(cert_pem: str | bytes) -> str:
    pem = cert_pem.decode() if isinstance(cert_pem, bytes) else cert_pem
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
