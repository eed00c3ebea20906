"""A result's key gains its capture time: frame ids start again with every daemon start (a new
source object numbers from its first frame), so (line, camera, frame_id, tier) alone made every
result after a restart a "duplicate" of an earlier run's and it was never stored.

Revision ID: 0002_results_key_t_capture
Revises: 0001_initial
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0002_results_key_t_capture"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

OLD = ("uq_results_line_camera_frame_id_tier", ["line", "camera", "frame_id", "tier"])
NEW = ("uq_results_line_camera_frame_id_tier_t_capture", ["line", "camera", "frame_id", "tier", "t_capture"])


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:  # SQLite rebuilds the table; PostgreSQL alters it
        batch.drop_constraint(OLD[0], type_="unique")
        batch.create_unique_constraint(*NEW)


def downgrade() -> None:
    # fails where two runs stored the same frame id: the old key cannot hold both
    with op.batch_alter_table("results") as batch:
        batch.drop_constraint(NEW[0], type_="unique")
        batch.create_unique_constraint(*OLD)
