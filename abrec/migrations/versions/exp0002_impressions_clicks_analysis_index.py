"""experiments: covering indexes for the per-user analysis lookups on impressions and clicks

The nightly report counts each exposed user's events by (experiment, phase, user, time range,
in_analysis). With these columns in the index, one seek per user answers it without reading the
table rows, which on SQLite replaces a sort of the whole log grouped by user.

Revision ID: exp0002
Revises: exp0001
Create Date: 2026-11-27 10:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = 'exp0002'
down_revision: str | Sequence[str] | None = 'exp0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ['experiment_id', 'phase_id', 'user_id', 'created_at', 'in_analysis']


def upgrade() -> None:
    op.create_index('ix_impressions_analysis', 'impressions', COLUMNS, unique=False)
    op.create_index('ix_clicks_analysis', 'clicks', COLUMNS, unique=False)


def downgrade() -> None:
    op.drop_index('ix_clicks_analysis', table_name='clicks')
    op.drop_index('ix_impressions_analysis', table_name='impressions')
