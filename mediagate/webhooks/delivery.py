"""One attempt to deliver an event to one endpoint, and when to try again.

The body is the exact JSON written to the outbox; the headers are Standard Webhooks'
(``webhook-id``: the event's id, the same on every attempt; ``webhook-timestamp``: this
attempt's time; ``webhook-signature``: ``v1,`` and the HMAC-SHA256 made by the
``standardwebhooks`` library with the endpoint's secret). The attempt connects to the
address ``targets.resolve`` checked, follows no redirect (a 3xx is a failure, as the
spec says), reads at most a few kB of the answer and gives up after a short timeout.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from standardwebhooks import Webhook

from mediagate.webhooks.settings import WebhookSettings
from mediagate.webhooks.targets import (
    IpNetwork,
    TargetRefused,
    literal_address,
    parse_target,
    resolve,
)

USER_AGENT = "mediagate-webhooks/1.0"
# An attempt's client: a fresh one each time (a pooled connection made for one name must
# not carry another's request), with no proxy taken from the environment.
ClientFactory = Callable[[WebhookSettings], httpx.AsyncClient]


def plain_client(settings: WebhookSettings) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        follow_redirects=False, trust_env=False, timeout=httpx.Timeout(settings.timeout_s)
    )


@dataclass(frozen=True)
class AttemptResult:
    delivered: bool
    status: int | None = None
    error: str | None = None  # what went wrong, for the operator (no secret, no body)
    retry_after_s: float | None = None
    gone: bool = False  # 410: the receiver asks for no more


def signed_headers(event_id: str, payload: str, secret: str, now: float) -> dict[str, str]:
    """Standard Webhooks' three headers for one attempt."""
    timestamp = datetime.datetime.fromtimestamp(int(now), tz=datetime.UTC)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": Webhook(secret).sign(event_id, timestamp, payload),
    }


def retry_after(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header in seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    if value.strip().isascii() and value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


async def attempt(
    url: str,
    *,
    event_id: str,
    payload: str,
    secret: str,
    settings: WebhookSettings,
    allowed: tuple[IpNetwork, ...],
    new_client: ClientFactory = plain_client,
    clock: Callable[[], float] = time.time,
) -> AttemptResult:
    """POST ``payload`` to ``url`` once, if its address is allowed (else nothing is sent)."""
    try:
        target = parse_target(url)
        address = await resolve(target, allowed)
    except TargetRefused as refused:
        return AttemptResult(delivered=False, error=f"not sent: {refused}")
    headers = {
        **signed_headers(event_id, payload, secret, clock()),
        "host": target.host_header,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    extensions = {}
    if target.scheme == "https" and literal_address(target.host) is None:
        extensions["sni_hostname"] = target.host  # the certificate is checked for the name
    try:
        # the whole attempt, not each read: a receiver that drips bytes is cut off too
        async with (
            asyncio.timeout(settings.timeout_s),
            new_client(settings) as client,
            client.stream(
                "POST",
                target.url_at(address),
                content=payload.encode(),
                headers=headers,
                extensions=extensions,
            ) as response,
        ):
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read >= settings.max_response_bytes:
                    break
    except (TimeoutError, httpx.TimeoutException):
        return AttemptResult(delivered=False, error=f"no answer within {settings.timeout_s:g}s")
    except httpx.HTTPError as error:
        return AttemptResult(delivered=False, error=f"connection failed ({type(error).__name__})")
    except Exception as error:  # whatever else: a failed attempt, never a stuck event
        return AttemptResult(delivered=False, error=f"attempt failed ({type(error).__name__})")
    status = response.status_code
    if 200 <= status < 300:
        return AttemptResult(delivered=True, status=status)
    return AttemptResult(
        delivered=False,
        status=status,
        error=f"answered {status}",
        retry_after_s=retry_after(response.headers.get("retry-after"), clock()),
        gone=status == 410,
    )


def next_delay_s(
    attempts_made: int, settings: WebhookSettings, retry_after_s: float | None = None
) -> float | None:
    """How long after a failed attempt (the ``attempts_made``-th) the next one is made;
    ``None`` once the schedule is used up. A ``Retry-After`` longer than the schedule's
    wait is honoured, up to ``max_retry_after_s``."""
    delays = settings.retry_delays_s
    if attempts_made > len(delays):
        return None
    delay = delays[attempts_made - 1]
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, settings.max_retry_after_s))
    return delay
