"""One settings object for every process, read from `QF_*` environment variables.

The defaults are the embedded one-machine setup: SQLite, Celery over SQLAlchemy (kombu's
`sqla+sqlite` transport) and a local artifact directory, all under `QF_HOME`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QF_", extra="ignore")

    home: Path = Field(
        default=Path.home() / ".local" / "share" / "quantfoundry",
        description="Where the embedded defaults keep the database, broker and artifacts.",
    )
    database_url: str = Field(default="", description="SQLAlchemy URL; default SQLite in home.")
    broker_url: str = Field(default="", description="Celery broker; default SQLAlchemy in home.")
    artifact_dir: Path | None = Field(default=None, description="Local artifact sink directory.")
    queue: str = Field(default="gpu-default", description="Celery queue jobs are sent to.")
    device: str = Field(default="auto", description="Compute device for workers: auto|cpu|cuda.")
    lease_s: float = Field(
        default=120.0,
        description="A running job whose worker has not renewed it for this long "
        "is taken back by the reaper.",
    )
    max_attempts: int = Field(default=3, ge=1, description="Attempts before worker_lost.")
    dispatch_interval_s: float = Field(
        default=1.0, description="How often the dispatcher sends the outbox and reaps leases."
    )
    redispatch_after_s: float = Field(
        default=300.0, description="A job still queued this long after it was sent is sent again."
    )
    cancel_poll_s: float = Field(
        default=1.0, description="Least seconds between two cancellation checks of a worker."
    )
    progress_interval_s: float = Field(
        default=0.5, description="Least seconds between two progress writes of one job."
    )

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'quantfoundry.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.db'}"
        if self.artifact_dir is None:
            self.artifact_dir = self.home / "artifacts"
        return self

    def ensure_dirs(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        assert self.artifact_dir is not None
        self.artifact_dir.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
