"""API tokens and teams, idempotency and natural keys, calibration uploads, measurements for
/metrics, outbound webhook deliveries, watched Hub repos, cancel grace bookkeeping

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 08:55:21
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("team", sa.String(length=100), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=True),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "calibration_uploads",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("team", sa.String(length=100), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=True),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("calibration_uploads", schema=None) as batch_op:
        batch_op.create_index("ix_calibration_uploads_team", ["team"], unique=False)

    op.create_table(
        "job_measurements",
        sa.Column("id", _BIGID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("job_measurements", schema=None) as batch_op:
        batch_op.create_index("ix_job_measurements_name_label", ["name", "label"], unique=False)

    op.create_table(
        "watched_repos",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("branch", sa.String(length=200), nullable=False),
        sa.Column("team", sa.String(length=100), nullable=False),
        sa.Column("specs", sa.JSON(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "model_id", "branch", "team", name="uq_watched_repos_model_branch_team"
        ),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", _BIGID, autoincrement=True, nullable=False),
        sa.Column("msg_id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_type", sa.String(length=40), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=False),
        sa.Column("delivered_at", _TS, nullable=True),
        sa.Column("failed_at", _TS, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("msg_id"),
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_webhook_deliveries_due",
            ["delivered_at", "failed_at", "next_attempt_at"],
            unique=False,
        )

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        # Jobs from before tokens existed belong to the team `default`.
        batch_op.add_column(
            sa.Column("team", sa.String(length=100), nullable=False, server_default="default")
        )
        batch_op.add_column(sa.Column("owner", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("natural_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("callback_url", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("queued_at", _TS, nullable=True))
        batch_op.add_column(sa.Column("task_id", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("cancel_requested_at", _TS, nullable=True))
        batch_op.create_index(
            "ix_jobs_team_created_at_id", ["team", "created_at", "id"], unique=False
        )
        batch_op.create_index("ix_jobs_team_natural_key", ["team", "natural_key"], unique=False)
        batch_op.create_unique_constraint(
            "uq_jobs_team_idempotency_key", ["team", "idempotency_key"]
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_jobs_team_idempotency_key", type_="unique")
        batch_op.drop_index("ix_jobs_team_natural_key")
        batch_op.drop_index("ix_jobs_team_created_at_id")
        for name in (
            "cancel_requested_at",
            "task_id",
            "queued_at",
            "callback_url",
            "natural_key",
            "request_hash",
            "idempotency_key",
            "owner",
            "team",
        ):
            batch_op.drop_column(name)

    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_due")
    op.drop_table("webhook_deliveries")
    op.drop_table("watched_repos")
    with op.batch_alter_table("job_measurements", schema=None) as batch_op:
        batch_op.drop_index("ix_job_measurements_name_label")
    op.drop_table("job_measurements")
    with op.batch_alter_table("calibration_uploads", schema=None) as batch_op:
        batch_op.drop_index("ix_calibration_uploads_team")
    op.drop_table("calibration_uploads")
    op.drop_table("api_tokens")
