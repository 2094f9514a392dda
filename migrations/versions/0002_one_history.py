"""One history: the chain row (head version and trainer lease), claims fenced by the lease epoch,
restores ordered among edits, checkpoint blobs in the database; the stream no longer carries
the queue (published_at goes).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    chain = op.create_table(
        "chain",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("head_version_id", sa.Integer(), sa.ForeignKey("versions.id")),
        sa.Column("trainer", sa.String(200)),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("lease_expires", sa.Float(), nullable=False),
        sa.Column("heartbeat", sa.Float(), nullable=False),
    )
    # Before this revision the current version was the newest row.
    head = op.get_bind().execute(sa.text("SELECT max(id) FROM versions")).scalar()
    op.bulk_insert(chain, [{"id": 1, "head_version_id": head, "epoch": 0, "lease_expires": 0.0, "heartbeat": 0.0}])
    with op.batch_alter_table("edits") as batch:
        batch.add_column(sa.Column("claim_epoch", sa.Integer()))
        batch.drop_column("published_at")  # the SQL rows are the queue; the stream only wakes workers
    with op.batch_alter_table("restores") as batch:
        batch.add_column(sa.Column("after_edit_id", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("restores") as batch:
        batch.drop_column("after_edit_id")
    with op.batch_alter_table("edits") as batch:
        batch.drop_column("claim_epoch")
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True)))
    op.drop_table("chain")
    op.drop_table("blobs")
