"""Episode texts: the prompt and response as the model's tokenizer decoded them where the episode
was made, so exports carry ``prompt`` / ``completion`` text beside the token ids (what TRL and
OpenRLHF datasets read) without a tokenizer at hand. NULL: not logged (episodes logged before
this revision, or by a client without the tokenizer). Both tables a Log stream touches get them.

Adding a nullable column without a default changes only the catalog: no table rewrite, and the
lock is held for an instant.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TABLES = ("trajectory_episodes", "episode_staging")


def upgrade() -> None:
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} ADD COLUMN prompt_text text, ADD COLUMN response_text text")


def downgrade() -> None:
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} DROP COLUMN prompt_text, DROP COLUMN response_text")
