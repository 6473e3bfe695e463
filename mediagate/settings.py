"""Process settings from the environment (``MEDIAGATE_*``), read once at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where mediagate keeps its state, and how the local CLI reaches Ray."""

    model_config = SettingsConfigDict(env_prefix="MEDIAGATE_")

    home: Path = Field(
        Path("~/.mediagate"), description="State directory: SQLite, artifacts, model cache."
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()


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
