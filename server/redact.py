"""Masking secrets in text that came from outside before it reaches a log line or a tenant.

An upstream's error text may echo the credential it was sent (some providers quote the whole key in a 401),
and an operator's log is read by more people than the provider keys should be. `mask` replaces the secrets
the caller knows (a provider's keys) and anything shaped like a credential: a bearer token, an OpenAI-style
`sk-...` key, the plane's own `hw-`/`hwa-`/`hwn-` keys, `api_key=...` in a URL or a message. `bounded` cuts
text to a length a log line can afford.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
# Known secrets shorter than this are not searched for: a two-letter "key" would mask half of every message.
_MIN_KNOWN_SECRET = 8
_SHAPED_LIKE_SECRETS = re.compile(
    r"(?P<keep>\bbearer\s+)\S+"
    r"|(?P<prefix>\b(?:sk|hw|hwa|hwn|hwt|pk|rk|xai|gsk)[-_])[A-Za-z0-9_\-*.]{6,}"
    r"|(?P<name>\b(?:api[_-]?key|access[_-]?token|token|secret|password)\b[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,;]{4,}",
    re.IGNORECASE,
)


def mask(text: str, known: Iterable[str] = ()) -> str:
    """`text` with every secret in `known` and everything shaped like a credential replaced by `***`."""
    for secret in known:
        if len(secret) >= _MIN_KNOWN_SECRET and secret in text:
            text = text.replace(secret, MASK)
    return _SHAPED_LIKE_SECRETS.sub(_masked, text)


def _masked(match: re.Match[str]) -> str:
    kept = match.group("keep") or match.group("prefix") or match.group("name") or ""
    return kept + MASK


def bounded(text: str, limit: int = 500) -> str:
    """At most `limit` characters of `text`, saying how many were left out, on one line."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"
