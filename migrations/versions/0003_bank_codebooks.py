"""PQ codebooks, versioned per bank.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE bank_codebooks (
            bank_id     bigint NOT NULL REFERENCES banks(id) ON DELETE CASCADE,
            version     bigint NOT NULL CHECK (version > 0),
            digest      bytea NOT NULL,
            blob        bytea NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (bank_id, version)
        )
        """
    )
    op.execute("ALTER TABLE bank_codebooks ALTER COLUMN blob SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.execute("DROP TABLE bank_codebooks")
