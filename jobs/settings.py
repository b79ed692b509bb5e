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
    queue_prefix: str = Field(
        default="gpu",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Jobs go to the Celery queue `{prefix}-{priority}` (gpu-high, gpu-default, "
        "gpu-low).",
    )
    queue: str = Field(
        default="",
        description="The queues a worker takes jobs from, comma-separated, most urgent first; "
        "default: all three priority queues of queue_prefix.",
    )
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
    cancel_grace_s: float = Field(
        default=300.0,
        gt=0,
        description="A running job still cancelling this long after the cancel was asked has "
        "its worker process killed (the slot is freed) and becomes cancelled.",
    )
    job_time_limit_s: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="A job still running after this long fails with reason timeout.",
    )
    broker_visibility_timeout_s: float | None = Field(
        default=None,
        description="Redis redelivers an unacknowledged message after this long; must exceed "
        "the job time limit (default: the limit plus one hour).",
    )
    token_pepper: str = Field(
        default="",
        description="Server-side secret API tokens are hashed with (HMAC-SHA256). Required "
        "outside the embedded default, where a random one is kept in home/token-pepper.",
    )
    token_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="An API process remembers a live token this long instead of reading the "
        "token table on every request: a token revoked through another process (the CLI, "
        "another API replica) is refused within this many seconds; one revoked through this "
        "process at once. 0: read the table on every request.",
    )
    calibration_max_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1, description="Largest calibration upload."
    )
    hf_webhook_secret: str = Field(
        default="",
        description="Secret the Hub sends in X-Webhook-Secret to POST /v1/hooks/hf "
        "(unset: the endpoint refuses every call).",
    )
    webhook_secret: str = Field(
        default="",
        description="Signing secret of completion callbacks (Standard Webhooks, `whsec_` + "
        "base64); jobs with a callback_url are refused while it is unset.",
    )
    webhook_max_attempts: int = Field(default=8, ge=1, description="Callback delivery tries.")
    webhook_backoff_s: float = Field(
        default=5.0, gt=0, description="First retry delay of a callback; doubles each time."
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="Callback HTTP timeout.")

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'quantfoundry.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.db'}"
        if self.artifact_dir is None:
            self.artifact_dir = self.home / "artifacts"
        if self.broker_visibility_timeout_s is None:
            self.broker_visibility_timeout_s = self.job_time_limit_s + 3600.0
        if self.broker_visibility_timeout_s <= self.job_time_limit_s + 60:
            # Redis would hand a still-running job's message to a second worker.
            raise ValueError(
                f"broker_visibility_timeout_s ({self.broker_visibility_timeout_s:.0f}) must "
                f"exceed job_time_limit_s ({self.job_time_limit_s:.0f}) plus 60 s"
            )
        return self

    def worker_queues(self) -> list[str]:
        """The queues a worker consumes, most urgent first."""
        if self.queue.strip():
            return [q.strip() for q in self.queue.split(",") if q.strip()]
        return [f"{self.queue_prefix}-{p}" for p in ("high", "default", "low")]

    def queue_for(self, priority: str) -> str:
        return f"{self.queue_prefix}-{priority}"

    def ensure_dirs(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        assert self.artifact_dir is not None
        self.artifact_dir.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
