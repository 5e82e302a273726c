"""Signed impression ids: `<32 hex id>.<issued at, unix seconds>.<HMAC-SHA256, 32 hex>`.

The signature binds the impression's row id to its issue time with the server's secret, so a
client cannot invent an impression, point a click at somebody else's row by guessing ids, or move
the issue time to stretch the attribution window. What the impression contains (slate, arm, user)
is read from its committed row, never from the token.
"""

from __future__ import annotations

import hashlib
import hmac
import re

_TOKEN_RE = re.compile(r"^([0-9a-f]{32})\.([0-9]{1,12})\.([0-9a-f]{32})$")


class BadToken(ValueError):
    """Malformed or forged impression id."""


class Signer:
    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("the signing secret must not be empty")
        # The keyed state after the key's blocks, copied per token instead of re-deriving it.
        self._keyed = hmac.new(secret.encode(), digestmod=hashlib.sha256)

    def _mac(self, row_id: str, issued_at: int) -> str:
        mac = self._keyed.copy()
        mac.update(f"{row_id}.{issued_at}".encode())
        return mac.hexdigest()[:32]  # 128 bits

    def sign(self, row_id: str, issued_at: int) -> str:
        return f"{row_id}.{issued_at}.{self._mac(row_id, issued_at)}"

    def verify(self, token: str) -> tuple[str, int]:
        """(row id, issued at) of a genuine token; BadToken otherwise."""
        match = _TOKEN_RE.match(token) if isinstance(token, str) else None
        if match is None:
            raise BadToken("impression_id is malformed (expected '<32 hex>.<unix time>.<32 hex>')")
        row_id, issued, mac = match.group(1), int(match.group(2)), match.group(3)
        if not hmac.compare_digest(mac, self._mac(row_id, issued)):
            raise BadToken("impression_id has an invalid signature (forged or from another server)")
        return row_id, issued
