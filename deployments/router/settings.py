"""The router's limits at the edge (part of the typed application arguments)."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from mediagate.settings import absolute_http_url


class RouterSettings(BaseModel):
    """Limits at the edge; part of the typed application arguments."""

    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger bodies get 413.")
    max_prompt_chars: int = Field(4000, ge=1, description="Longer prompts get 400.")
    url_ttl_s: int = Field(3600, ge=10, description="Lifetime of image URLs.")
    artifact_sweep_s: float = Field(300, gt=0, description="How often expired files are removed.")
    max_upload_bytes: int = Field(
        20 * 1_048_576,
        ge=1024,
        description="Body limit of the routes that take image uploads (videos, edits).",
    )
    max_reference_pixels: int = Field(
        4096 * 4096, ge=64, description="Uploaded images with more pixels are refused unread."
    )
    image_processes: int = Field(
        1,
        ge=0,
        le=64,
        description="Processes of each router replica that check (moderation), encode and "
        "sign images, out of the process that serves requests: under a flood of requests "
        "their CPU never waits on its event loop. 0 runs them in the replica's own threads.",
    )
    poll_after_ms: int = Field(
        1000, ge=50, description="`openai-poll-after-ms` on video GETs: how often clients poll."
    )
    load_refresh_s: float = Field(
        0.2, gt=0, description="How often the router reads each image scheduler's wait estimates."
    )
    load_max_age_s: float = Field(
        2.0, gt=0, description="Older wait estimates are not used to refuse requests early."
    )
    console: bool = Field(
        True, description="Serve the web console (playground at /, operations at /ops)."
    )
    ops_limit_changes: bool = Field(
        True,
        description="Operator keys may change autoscaling limits from the console "
        "(POST /v1/ops/limits, audited); false leaves them to `mediagate scale set`.",
    )
    public_base_url: str | None = Field(
        None,
        description="Where clients reach mediagate (e.g. https://images.example.com): the base "
        "of every download URL. `mediagate up` sets it to the address it serves on. Never "
        "taken from a request's Host header, which the client chooses.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header values (host or host:port) whose requests get download URLs "
        "on that same host, e.g. a second public name; any other host gets public_base_url.",
    )

    @field_validator("public_base_url")
    @classmethod
    def _absolute_http_url(cls, value: str | None) -> str | None:
        return None if value is None else absolute_http_url(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _lowercase_hosts(cls, hosts: list[str]) -> list[str]:
        return [host.strip().lower() for host in hosts if host.strip()]
