"""A lot's key gains its line: lot ids are chosen by each line's PLC (or generated from the time
on each box), so two lines sharing a database could write the same id, and the second line's
open/close times, recipe and counts overwrote the first's row.

Revision ID: 0003_lots_key_line
Revises: 0002_results_key_t_capture
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0003_lots_key_line"
down_revision = "0002_results_key_t_capture"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # every existing row has a line (NOT NULL) and a unique lot id, so it is unique on both
    with op.batch_alter_table("lots", recreate="always") as batch:  # the table is copied (SQLite and PostgreSQL)
        batch.drop_constraint("pk_lots", type_="primary")
        batch.create_primary_key("pk_lots", ["line", "lot_id"])


def downgrade() -> None:
    # fails where two lines stored the same lot id: the old key cannot hold both
    with op.batch_alter_table("lots", recreate="always") as batch:
        batch.drop_constraint("pk_lots", type_="primary")
        batch.create_primary_key("pk_lots", ["lot_id"])
