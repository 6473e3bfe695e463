"""Process settings from the environment (``MEDIAGATE_*``), read once at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mediagate.stores import StateConfig
from mediagate.stores.artifacts import ArtifactConfig


class Settings(BaseSettings):
    """Where mediagate keeps its state, and how the local CLI reaches Ray."""

    model_config = SettingsConfigDict(env_prefix="MEDIAGATE_")

    home: Path = Field(
        Path("~/.mediagate"), description="State directory: SQLite, artifacts, model cache."
    )
    tiers_file: Path | None = Field(
        None, description="Tier policy YAML; the shipped mediagate/configs/tiers.yaml if unset."
    )
    redis_url: str | None = Field(
        None, description="redis:// URL: keep state in Redis instead of SQLite."
    )
    s3_bucket: str | None = Field(
        None, description="Keep artifacts in this S3 bucket instead of local files."
    )
    s3_prefix: str = Field("mediagate/", description="Key prefix for artifacts in the bucket.")
    s3_endpoint_url: str | None = Field(
        None, description="An S3-compatible endpoint (MinIO, R2, ...); AWS if unset."
    )
    s3_region: str | None = Field(None, description="AWS region of the bucket.")
    webhook_allowed_networks: str = Field(
        "",
        description="Comma-separated private networks (CIDR) webhooks may reach, e.g. "
        "127.0.0.1/32 for a receiver on this machine; none by default.",
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def webhook_networks(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.webhook_allowed_networks.split(",") if n.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


class HomeLayout:
    """Names of everything under ``MEDIAGATE_HOME``."""

    def __init__(self, home: str | Path) -> None:
        self.root = Path(home).expanduser().resolve()

    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def model_cache(self) -> Path:
        return self.root / "models"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def serve_config(self) -> Path:
        return self.root / "serve.yaml"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def live_catalog(self) -> Path:
        """The models `mediagate models` deployed, as a catalog file (kept up to date
        after every change, for the operator's version control)."""
        return self.root / "models.yaml"


def state_config(settings: Settings, layout: HomeLayout) -> StateConfig:
    """Redis when MEDIAGATE_REDIS_URL is set, else SQLite under MEDIAGATE_HOME."""
    if settings.redis_url:
        return StateConfig(backend="redis", redis_url=settings.redis_url)
    return StateConfig.embedded(layout.state_db)


def artifact_config(settings: Settings, layout: HomeLayout) -> ArtifactConfig:
    """S3 when MEDIAGATE_S3_BUCKET is set, else files under MEDIAGATE_HOME."""
    if settings.s3_bucket:
        return ArtifactConfig(
            backend="s3",
            s3_bucket=settings.s3_bucket,
            s3_prefix=settings.s3_prefix,
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_region=settings.s3_region,
        )
    return ArtifactConfig(
        backend="local",
        root=str(layout.artifacts),
        secret_path=str(layout.secrets / "url_signing_key"),
    )


def absolute_http_url(value: str) -> str:
    """``value`` as the base of download URLs (``http(s)://host[:port][/path]``, no
    query), without its trailing slash; ``ValueError`` otherwise. The router's
    ``public_base_url`` and ``mediagate up --public-url`` take the same."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError(f"{value!r} is not http(s)://host[:port][/path]")
    return value.rstrip("/")
