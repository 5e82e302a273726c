"""Clients of the model server, as API processes use them: torch-free, with a per-request deadline.

Two implementations share one interface (`ModelClient`): `HttpModelClient` talks to
`abrec model-server` over keep-alive HTTP; `InProcessModelClient` calls a `ModelServer` object that
runs inside the same process (the single-process demo). Any failure — refused connection, the
deadline passing, an error answer, a malformed answer — raises `ModelUnavailable`, so the caller has
exactly one exception to turn into its fallback.

Wire protocol (compact JSON, one request per recommendation):
    POST /v1/recommend {"model": "tron@champion", "items": ["i1", "i2"], "k": 20, "exclude_seen": false}
    200 -> {"items": ["i9", ...], "version": "tron:3", "unknown": 0}
    4xx/5xx -> {"error": "what went wrong"}
    GET /readyz -> 200 when every model is loaded and warmed up, else 503.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import urllib3

if TYPE_CHECKING:  # the server (and torch) are only needed by the in-process client's caller
    from abrec.models.server import ModelServer

_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Recommendation:
    items: list[str]  # the shop's item ids, best first
    version: str  # the model version that computed them, e.g. "tron:3"
    unknown_items: int  # request items the model's id map does not know (ignored)


class ModelUnavailable(Exception):
    """The model server could not answer in time: the caller should serve its fallback."""


class ModelClient(Protocol):
    def recommend(
        self, alias: str, items: list[str], k: int, *, exclude_seen: bool = False, deadline_s: float = 0.05
    ) -> Recommendation: ...

    def ready(self) -> bool: ...


def _parse_answer(data: Any) -> Recommendation:
    try:
        items, version, unknown = data["items"], data["version"], data["unknown"]
    except (TypeError, KeyError) as exc:
        raise ModelUnavailable(f"malformed answer from the model server: {data!r:.200}") from exc
    if not isinstance(items, list) or not isinstance(version, str) or not isinstance(unknown, int):
        raise ModelUnavailable(f"malformed answer from the model server: {data!r:.200}")
    return Recommendation(items=[str(i) for i in items], version=version, unknown_items=unknown)


class HttpModelClient:
    """Thread-safe client over a pool of keep-alive connections to one model server.

    The deadline is the total time allowed for the request (connect + send + answer); there are no
    retries, since a retry could only land after the deadline anyway.
    """

    def __init__(self, base_url: str, *, pool_size: int = 32) -> None:
        self.base_url = base_url.rstrip("/")
        # block=False: a burst beyond pool_size opens extra connections instead of queueing for one.
        self._pool = urllib3.connection_from_url(self.base_url, maxsize=pool_size, block=False, retries=False)

    def recommend(
        self, alias: str, items: list[str], k: int, *, exclude_seen: bool = False, deadline_s: float = 0.05
    ) -> Recommendation:
        body = json.dumps(
            {"model": alias, "items": items, "k": k, "exclude_seen": exclude_seen}, separators=(",", ":")
        )
        try:
            resp = self._pool.request(
                "POST",
                "/v1/recommend",
                body=body.encode(),
                headers=_JSON,
                timeout=urllib3.Timeout(total=deadline_s),
                retries=False,
            )
            data = json.loads(resp.data)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise ModelUnavailable(f"model server at {self.base_url}: {exc}") from exc
        if resp.status != 200:
            error = data.get("error") if isinstance(data, dict) else None
            raise ModelUnavailable(f"model server answered {resp.status}: {error or data!r:.200}")
        return _parse_answer(data)

    def ready(self) -> bool:
        try:
            resp = self._pool.request("GET", "/readyz", timeout=urllib3.Timeout(total=1.0), retries=False)
        except (urllib3.exceptions.HTTPError, OSError):
            return False
        return resp.status == 200

    def close(self) -> None:
        self._pool.close()


class InProcessModelClient:
    """The same interface over a `ModelServer` running in this process (no HTTP, no copies)."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def recommend(
        self, alias: str, items: list[str], k: int, *, exclude_seen: bool = False, deadline_s: float = 0.05
    ) -> Recommendation:
        try:
            result = self.server.recommend(alias, items, k, exclude_seen=exclude_seen, timeout=deadline_s)
        except Exception as exc:  # the contract: every failure of the model side is ModelUnavailable
            raise ModelUnavailable(f"in-process model server: {exc}") from exc
        return Recommendation(items=result.items, version=result.version, unknown_items=result.unknown)

    def ready(self) -> bool:
        return self.server.is_ready()
