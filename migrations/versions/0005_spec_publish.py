"""spec: ignore, overrides, quality gate, destination, priority, labels; publish record

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 08:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        # Server defaults give rows written before this revision the spec defaults.
        batch_op.add_column(
            sa.Column("ignore", sa.JSON(), nullable=False, server_default='["lm_head"]')
        )
        batch_op.add_column(sa.Column("overrides", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("quality_gate", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("destination", sa.JSON(), nullable=False, server_default='{"kind": "local"}')
        )
        batch_op.add_column(
            sa.Column("priority", sa.String(length=16), nullable=False, server_default="default")
        )
        batch_op.add_column(sa.Column("labels", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("publish_commit", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("publish_url", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for name in (
            "publish_url",
            "publish_commit",
            "labels",
            "priority",
            "destination",
            "quality_gate",
            "overrides",
            "ignore",
        ):
            batch_op.drop_column(name)
