"""Edit log, versions, checkpoints and restore commands.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("versions.id")),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("restored_from_id", sa.Integer(), sa.ForeignKey("versions.id")),
        sa.Column("checkpoint_sha256", sa.String(64), sa.ForeignKey("checkpoints.sha256"), nullable=False),
        sa.Column("edit_count", sa.Integer(), nullable=False),
        sa.Column("is_base", sa.Boolean(), unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "edits",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("relation", sa.Text(), nullable=False),
        sa.Column("object", sa.Text(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("versions.id"), index=True),
        sa.Column("idempotency_key", sa.String(200)),
        sa.Column("idempotency_position", sa.Integer()),
        sa.Column("fingerprint", sa.String(64)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("steps", sa.Integer()),
        sa.Column("loss", sa.Float()),
        sa.Column("train_seconds", sa.Float()),
        sa.Column("losses", sa.JSON()),
        sa.Column("basis_weights", sa.JSON()),
        sa.Column("metrics", sa.JSON()),
        sa.UniqueConstraint("idempotency_key", "idempotency_position"),
    )
    op.create_table(
        "restores",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("target_version_id", sa.Integer(), sa.ForeignKey("versions.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("versions.id")),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("restores")
    op.drop_table("edits")
    op.drop_table("versions")
    op.drop_table("checkpoints")
