"""Which model of the release answers a request: sticky, hash-based canary assignment.

In ``canary`` the challenger answers a share of the requests. The share is assigned by a hash of
a request key (the ``X-Request-Key`` header a client sets, such as a user or session id, else the
request id), so one client sees one model, and raising the share only adds keys: a key answered
by the challenger at 10% is still answered by it at 20%. Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib

REQUEST_KEY_HEADER = "X-Request-Key"
"""The header naming the key a request is assigned by (a user, a session); else the request id."""

_HASH_SPACE = 2**64


def answered_by_challenger(key: str, share: float) -> bool:
    """Whether the challenger answers a request with this key when it answers ``share`` of them.

    The key's BLAKE2b hash, read as a number in [0, 1), is compared with the share: uniform over
    keys, the same for a key on every replica and every run.

    Raises:
        ValueError: if ``share`` is not within [0, 1].

    """
    if not 0 <= share <= 1:
        raise ValueError(f"the challenger's share must be within [0, 1], got {share}")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPACE < share
