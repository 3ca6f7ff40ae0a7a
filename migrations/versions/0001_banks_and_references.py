"""Tenants, API keys, banks, and references partitioned by bank.

References are LIST-partitioned by bank_id: each bank gets its own partition (created by
CreateBank, dropped by DeleteBank) with an HNSW index on its embeddings cast to the bank's
dimension. Why partitions: banks differ in dimension (an HNSW index needs one), a query scans
only its own bank's graph, and deleting a bank is a DROP, not a mass DELETE.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute(
        """
        CREATE TABLE tenants (
            id          bigserial PRIMARY KEY,
            name        text NOT NULL UNIQUE,
            created_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE api_keys (
            key_id      text PRIMARY KEY,
            tenant_id   bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            secret_hash bytea NOT NULL,
            label       text NOT NULL DEFAULT '',
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz
        )
        """
    )
    op.execute(
        """
        CREATE TABLE banks (
            id                bigserial PRIMARY KEY,
            tenant_id         bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            name              text NOT NULL,
            model_fingerprint text NOT NULL,
            memory_spec       jsonb NOT NULL,
            embedder_name     text NOT NULL,
            embedder_dim      integer NOT NULL CHECK (embedder_dim BETWEEN 1 AND 16000),
            metric            text NOT NULL CHECK (metric IN ('cosine', 'l2', 'ip')),
            created_at        timestamptz NOT NULL DEFAULT now(),
            UNIQUE (tenant_id, name)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE memory_references (
            bank_id       bigint NOT NULL,
            external_id   text NOT NULL,
            text          text NOT NULL,
            metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
            embedding     vector NOT NULL,
            memory        bytea,
            memory_size   bigint NOT NULL DEFAULT 0,
            memory_crc32  bigint NOT NULL DEFAULT 0,
            content_hash  bytea NOT NULL,
            updated_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (bank_id, external_id)
        ) PARTITION BY LIST (bank_id)
        """
    )
    # Encoded memories are already compressed: store them out of line, uncompressed.
    op.execute("ALTER TABLE memory_references ALTER COLUMN memory SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.execute("DROP TABLE memory_references")
    op.execute("DROP TABLE banks")
    op.execute("DROP TABLE api_keys")
    op.execute("DROP TABLE tenants")
