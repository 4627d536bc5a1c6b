"""The parts of the plane <-> agent contract that are not messages: both sides import them from here.

- An enrollment token is `<secret>.<sha256 of the plane's node CA certificate, hex>`: the agent pins the
  plane's certificate by that fingerprint on first contact (like kubeadm's discovery hash). It may go on with
  `.<base64url of "HOST:PORT,HOST:PORT">`, the node service addresses of the gateway's planes (`hatchway admin
  nodes token create --plane`), so that `hatchway-agent enroll` needs no `--plane` and knows every plane.
- The plane's own node certificate names `hatchway-plane`; agents check that name rather than the address they
  dialled, so NAT, IPs and DNS aliases need no re-issued certificate. A certificate the operator provides
  instead is checked against the address dialled.
- A node authenticates each `Connect` with the metadata `authorization: Bearer <node credential>`.
- Messages have explicit size caps both ways (gRPC's defaults differ by direction and by library), and node
  names a charset and length both sides check.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import Sequence

PLANE_TLS_NAME = "hatchway-plane"
AUTHORIZATION = "authorization"


def join_enrollment_token(secret: str, ca_fingerprint: str, planes: Sequence[str] = ()) -> str:
    if not planes:
        return f"{secret}.{ca_fingerprint}"
    encoded = base64.urlsafe_b64encode(",".join(planes).encode()).decode().rstrip("=")
    return f"{secret}.{ca_fingerprint}.{encoded}"


def _token_parts(token: str) -> tuple[str, str, str]:
    """(secret, fingerprint, encoded plane list): neither the secret, the hex fingerprint nor base64url holds a
    dot, so a third dot-separated part can only be the plane list."""
    head, planes = token.strip(), ""
    if head.count(".") >= 2:
        head, _, planes = head.rpartition(".")
    secret, _, fingerprint = head.rpartition(".")
    return (secret, fingerprint, planes) if secret else (head, "", planes)


def split_enrollment_token(token: str) -> tuple[str, str]:
    """(secret, CA fingerprint); the fingerprint is empty for a token without one."""
    secret, fingerprint, _ = _token_parts(token)
    return secret, fingerprint


def enrollment_token_planes(token: str) -> tuple[str, ...]:
    """The plane addresses the token carries, in the admin's order; () for a token without them.

    Raises ValueError when the token's third part is not a plane list (a token cut or mangled in transit)."""
    _, _, encoded = _token_parts(token)
    if not encoded:
        return ()
    try:
        text = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("the token's plane list is unreadable: copy the whole token again") from exc
    planes = tuple(p for p in text.split(",") if p)
    if not planes or any(plane_address_problem(p) for p in planes):
        raise ValueError("the token's plane list is unreadable: copy the whole token again")
    return planes


# A gateway has a handful of planes; a token stays short enough to paste into a shell.
PLANES_MAX = 16
PLANE_ADDRESS_MAX_CHARS = 255


def plane_address_problem(address: str) -> str:
    """Why `address` cannot be a plane's node service address (HOST:PORT, or [IPv6]:PORT), or "" when it can."""
    host, sep, port = address.rpartition(":")
    if len(address) > PLANE_ADDRESS_MAX_CHARS:
        return f"a plane address has at most {PLANE_ADDRESS_MAX_CHARS} characters"
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        return f"a plane address looks like HOST:PORT, not {address!r}"
    if any(c.isspace() or c == "," or not c.isprintable() for c in address):
        return f"a plane address holds no spaces, commas or control characters: {address!r}"
    return ""


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
