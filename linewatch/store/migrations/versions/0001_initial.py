"""Initial schema: model_versions, lots, results, regions.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False, comment="engine | ard | ..."),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("trained_on_lot", sa.String(128), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
    )
    op.create_table(
        "lots",
        sa.Column("lot_id", sa.String(128), nullable=False),
        sa.Column("line", sa.String(64), nullable=False),
        sa.Column("recipe", sa.String(128), nullable=False, server_default=""),
        sa.Column("opened_at", _TS, nullable=True),
        sa.Column("closed_at", _TS, nullable=True),
        sa.Column("open_reason", sa.String(64), nullable=True),
        sa.Column("close_reason", sa.String(64), nullable=True),
        sa.Column("n_frames", sa.Integer(), nullable=True),
        sa.Column("n_ok", sa.Integer(), nullable=True),
        sa.Column("n_ng", sa.Integer(), nullable=True),
        sa.Column("n_not_inspected", sa.Integer(), nullable=True),
        sa.Column("n_fault", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("lot_id", name="pk_lots"),
    )
    op.create_index("ix_lots_opened_at", "lots", ["opened_at"])
    op.create_table(
        "results",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("line", sa.String(64), nullable=False),
        sa.Column("camera", sa.String(64), nullable=False),
        sa.Column("lot_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("frame_id", sa.BigInteger(), nullable=False),
        sa.Column("tier", sa.SmallInteger(), nullable=False, comment="1 = per frame, 2 = refined at lot end"),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False, server_default=""),
        sa.Column("t_capture", _TS, nullable=False),
        sa.Column("t_inspected", _TS, nullable=True),
        sa.Column("t_publish", _TS, nullable=True),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_results"),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"],
                                name="fk_results_model_version_id_model_versions"),
        sa.UniqueConstraint("line", "camera", "frame_id", "tier",
                            name="uq_results_line_camera_frame_id_tier"),
    )
    op.create_index("ix_results_lot_id", "results", ["lot_id"])
    op.create_index("ix_results_verdict", "results", ["verdict"])
    op.create_index("ix_results_t_capture", "results", ["t_capture"])
    op.create_index("ix_results_model_version_id", "results", ["model_version_id"])
    op.create_table(
        "regions",
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("result_id", _BigId, nullable=False),
        sa.Column("x0", sa.Integer(), nullable=False),
        sa.Column("y0", sa.Integer(), nullable=False),
        sa.Column("x1", sa.Integer(), nullable=False),
        sa.Column("y1", sa.Integer(), nullable=False),
        sa.Column("area_px", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_regions"),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], ondelete="CASCADE",
                                name="fk_regions_result_id_results"),
    )
    op.create_index("ix_regions_result_id", "regions", ["result_id"])


def downgrade() -> None:
    op.drop_table("regions")
    op.drop_table("results")
    op.drop_table("lots")
    op.drop_table("model_versions")
