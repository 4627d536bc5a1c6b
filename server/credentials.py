"""Secrets: generating and hashing bearer keys, and encrypting provider keys at rest.

Bearer keys are 256-bit random tokens, so one SHA-256 is enough to store them (a slow password hash buys
nothing against a key that cannot be guessed) and lets the hot path find a key with one dict lookup.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

API_KEY_PREFIX = "hw-"
ADMIN_KEY_PREFIX = "hwa-"
NODE_CREDENTIAL_PREFIX = "hwn-"
ENROLLMENT_TOKEN_PREFIX = "hwt-"
# How much of a key listings may show: the prefix plus a few random characters.
DISPLAY_PREFIX_LEN = 10


def generate_key(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # surrogatepass: a str from outside may carry lone surrogates (aiohttp decodes header bytes that are not
    # UTF-8 to them); hashing must not fail on it, and such a key matches nothing anyway.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class Vault:
    """Encrypts provider keys with a Fernet key derived from the operator's secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    @functools.cached_property
    def _fernet(self) -> Fernet:
        # Imported on first use: a plane whose providers hold no keys (local servers, nodes) never loads
        # cryptography, one of the largest imports of the plane (server.nodes.tls does the same for certificates).
        from cryptography.fernet import Fernet
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"hatchway provider keys v1").derive(
            self._secret.encode()
        )
        return Fernet(base64.urlsafe_b64encode(derived))

    @classmethod
    def from_settings(cls, secret: str, data_dir: Path) -> Vault:
        """Use the configured secret, else the one in `data_dir/secret.key`, creating it (0600) on first use."""
        if secret:
            return cls(secret)
        path = data_dir / "secret.key"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48))
        return cls(path.read_text().strip())

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        from cryptography.fernet import InvalidToken  # not at the top, as in `_fernet`

        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken as exc:
            raise ValueError("provider key cannot be decrypted: was HATCHWAY_SECRET_KEY changed?") from exc
