"""The parts of the plane <-> agent contract that are not messages: both sides import them from here.

- An enrollment token is `<secret>.<sha256 of the plane's node CA certificate, hex>`: the agent pins the
  plane's certificate by that fingerprint on first contact (like kubeadm's discovery hash).
- The plane's own node certificate names `hatchway-plane`; agents check that name rather than the address they
  dialled, so NAT, IPs and DNS aliases need no re-issued certificate. A certificate the operator provides
  instead is checked against the address dialled.
- A node authenticates each `Connect` with the metadata `authorization: Bearer <node credential>`.
- Messages have explicit size caps both ways (gRPC's defaults differ by direction and by library), and node
  names a charset and length both sides check.
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


# Agent -> plane. A Hello or Status within the plane's bounds (server/nodes/bounds.py) is under 200 KB; the largest
# legitimate message is a JobEnd carrying a whole embeddings result as JSON (about 1,000 inputs of 1,024
# dimensions). The agent answers a larger result with a JobError instead of sending it: a message over the cap
# ends the whole stream, every job on it included.
NODE_MESSAGE_MAX_BYTES = 16 * 1024 * 1024
# Plane -> agent. A JobRequest carries a client's request body, re-encoded (the plane's `max_body_bytes`, 8 MiB by
# default); the plane sends no node a body above this cap (the attempt fails over to another target instead).
PLANE_MESSAGE_MAX_BYTES = 64 * 1024 * 1024
# Room in a JobRequest for what surrounds the body (job id, endpoint, protobuf framing).
JOB_REQUEST_OVERHEAD_BYTES = 4096


def keepalive_options(interval_s: float) -> list[tuple[str, int]]:
    """gRPC options for keepalive pings every `interval_s`, a link whose ping goes unanswered as long being
    dropped, both ways of the node link: a peer gone without a reset (NAT, lid shut, cable) is found in seconds."""
    interval_ms = int(interval_s * 1000)
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", interval_ms),
        # gRPC times a ping out after this (default 60 s) whatever keepalive_timeout_ms says.
        ("grpc.http2.ping_timeout_ms", interval_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # Pings go on however long a side has nothing to send (gRPC stops after 2 otherwise).
        ("grpc.http2.max_pings_without_data", 0),
    ]


# A node's name is shown in listings, logs and error messages, and names the node in admin commands.
NODE_NAME_MAX_CHARS = 64


def node_name_problem(name: str) -> str:
    """Why `name` cannot name a node, or "" when it can: 1 to 64 printable characters (no control characters,
    NUL, line breaks or invisible format characters), not blank."""
    if not name.strip():
        return "a node name must not be empty"
    if len(name) > NODE_NAME_MAX_CHARS:
        return f"a node name has at most {NODE_NAME_MAX_CHARS} characters (this one has {len(name)})"
    if not name.isprintable():
        return "a node name may only hold printable characters (no control characters, NUL or line breaks)"
    return ""
