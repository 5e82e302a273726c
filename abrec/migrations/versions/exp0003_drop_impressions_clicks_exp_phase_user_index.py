"""experiments: drop the (experiment_id, phase_id, user_id) indexes on impressions and clicks

The analysis indexes of exp0002 start with the same three columns, so every query that used
these can use those; keeping both only slowed down each insert into the event log (SQLite:
about 30 % fewer rows/s with both, see benchmarks/RESULTS.md, report).

Revision ID: exp0003
Revises: exp0002
Create Date: 2026-11-27 11:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = 'exp0003'
down_revision: str | Sequence[str] | None = 'exp0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ['experiment_id', 'phase_id', 'user_id']


def upgrade() -> None:
    op.drop_index('ix_clicks_exp_phase_user', table_name='clicks')
    op.drop_index('ix_impressions_exp_phase_user', table_name='impressions')


def downgrade() -> None:
    op.create_index('ix_impressions_exp_phase_user', 'impressions', COLUMNS, unique=False)
    op.create_index('ix_clicks_exp_phase_user', 'clicks', COLUMNS, unique=False)
