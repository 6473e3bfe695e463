"""An account's webhook endpoints: one account document (``webhooks``) in the state
store, changed atomically like the quota ledger. Secrets are kept as given (the sender
signs with them) and shown only in the answer that created them."""

from __future__ import annotations

import base64
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mediagate.protocol.clock import Clock, system_clock
from mediagate.protocol.errors import InvalidRequest
from mediagate.protocol.webhooks import (
    EventType,
    WebhookEndpointCreate,
    WebhookEndpointView,
)
from mediagate.stores import JobStore
from mediagate.webhooks.settings import WebhookSettings
from mediagate.webhooks.targets import TargetRefused, allowed_networks, parse_target, resolve

DOCUMENT = "webhooks"


class StoredEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    url: str
    events: list[EventType]
    secret: str
    created_at: float
    status: Literal["enabled", "disabled"] = "enabled"
    disabled_reason: str | None = None
    failing_since: float | None = None
    last_delivered_at: float | None = None

    def view(self, *, with_secret: bool = False) -> WebhookEndpointView:
        return WebhookEndpointView(
            id=self.id,
            url=self.url,
            events=self.events,
            created_at=int(self.created_at),
            status=self.status,
            disabled_reason=self.disabled_reason,
            failing_since=None if self.failing_since is None else int(self.failing_since),
            secret=self.secret if with_secret else None,
        )


class EndpointBook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[StoredEndpoint] = Field(default_factory=list)

    @classmethod
    def of(cls, text: str | None) -> EndpointBook:
        return cls() if text is None else cls.model_validate_json(text)

    def text(self) -> str | None:
        return self.model_dump_json() if self.endpoints else None


def new_secret() -> str:
    """``whsec_`` and 32 random bytes in base64 (Standard Webhooks: 24 to 64 bytes)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_endpoint_id() -> str:
    return "wh_" + secrets.token_hex(12)


class WebhookEndpoints:
    """Add, list, remove and record deliveries of an account's endpoints."""

    def __init__(
        self, store: JobStore, settings: WebhookSettings, *, clock: Clock = system_clock
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.allowed = allowed_networks(settings.allowed_networks)

    async def add(self, account_id: str, request: WebhookEndpointCreate) -> WebhookEndpointView:
        """A new endpoint, its secret shown this once; a URL that may not be reached (or
        does not resolve) is a 400 on ``url``, and nothing is stored."""
        try:
            await resolve(parse_target(request.url), self.allowed)
        except TargetRefused as refused:
            raise InvalidRequest(
                f"webhook url refused: {refused}", param="url", code="invalid_url"
            ) from None
        endpoint = StoredEndpoint(
            id=new_endpoint_id(),
            url=request.url.strip(),
            events=request.events,
            secret=new_secret(),
            created_at=self.clock(),
        )
        limit = self.settings.max_endpoints_per_account

        def append(text: str | None) -> tuple[str | None, bool]:
            book = EndpointBook.of(text)
            if len(book.endpoints) >= limit:
                return text, False
            book.endpoints.append(endpoint)
            return book.text(), True

        if not await self.store.mutate(account_id, DOCUMENT, append):
            raise InvalidRequest(
                f"an account may have at most {limit} webhook endpoints; delete one first",
                param="url",
                code="webhook_limit_reached",
            )
        return endpoint.view(with_secret=True)

    async def list(self, account_id: str) -> list[StoredEndpoint]:
        return await self.store.mutate(
            account_id, DOCUMENT, lambda text: (text, EndpointBook.of(text).endpoints)
        )

    async def remove(self, account_id: str, endpoint_id: str) -> bool:
        def drop(text: str | None) -> tuple[str | None, bool]:
            book = EndpointBook.of(text)
            kept = [e for e in book.endpoints if e.id != endpoint_id]
            if len(kept) == len(book.endpoints):
                return text, False
            return EndpointBook(endpoints=kept).text(), True

        return await self.store.mutate(account_id, DOCUMENT, drop)

    async def record(
        self,
        account_id: str,
        endpoint_id: str,
        *,
        delivered: bool,
        disable_because: str | None = None,
    ) -> None:
        """After an attempt: a success clears ``failing_since``; a failure starts it; a
        reason disables the endpoint (deliveries to it stop until it is added again)."""
        now = self.clock()

        def note(text: str | None) -> tuple[str | None, None]:
            book = EndpointBook.of(text)
            for endpoint in book.endpoints:
                if endpoint.id != endpoint_id:
                    continue
                if delivered:
                    endpoint.failing_since = None
                    endpoint.last_delivered_at = now
                elif endpoint.failing_since is None:
                    endpoint.failing_since = now
                if disable_because is not None:
                    endpoint.status = "disabled"
                    endpoint.disabled_reason = disable_because
            return book.text(), None

        await self.store.mutate(account_id, DOCUMENT, note)
