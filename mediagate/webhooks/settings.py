"""How webhooks are delivered: plain data, part of the application's arguments."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Standard Webhooks' example schedule after the first attempt: 5 s, 5 min, 30 min, 2 h,
# 5 h, 10 h, 14 h, 20 h, 24 h (about three days in all).
SPEC_RETRY_DELAYS_S: tuple[float, ...] = (
    5,
    300,
    1800,
    7200,
    18000,
    36000,
    50400,
    72000,
    86400,
)


class WebhookSettings(BaseModel):
    """Where and how events are sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="Deliver events; false drops them as they come (registration works "
        "either way).",
    )
    allowed_networks: tuple[str, ...] = Field(
        (),
        description="Private, loopback or link-local networks (CIDR) targets may be in, "
        "e.g. 127.0.0.1/32 for tests or 10.20.0.0/16 on premises. Public addresses are "
        "always allowed; every other address never.",
    )
    retry_delays_s: tuple[float, ...] = Field(
        SPEC_RETRY_DELAYS_S,
        min_length=1,
        description="Waits before each retry; after the last one fails the endpoint is disabled.",
    )
    timeout_s: float = Field(10.0, gt=0, le=60, description="Per attempt: connect and answer.")
    max_response_bytes: int = Field(
        4096, ge=0, description="Of an answer's body, at most this much is read."
    )
    max_retry_after_s: float = Field(
        3600, ge=0, description="A `Retry-After` longer than this is cut to it."
    )
    claim_hold_s: float = Field(
        60.0,
        gt=0,
        description="How long a sender holds an event it took up; a sender lost mid-delivery "
        "leaves it to another after this long.",
    )
    poll_interval_s: float = Field(1.0, gt=0, description="How often the outbox is read.")
    max_endpoints_per_account: int = Field(10, ge=1)
    events_per_poll: int = Field(100, ge=1, description="Events taken up per outbox read.")

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, networks: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_network(network, strict=False)) for network in networks)

    @field_validator("retry_delays_s")
    @classmethod
    def _non_negative(cls, delays: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay < 0 for delay in delays):
            raise ValueError("retry delays must not be negative")
        return delays
