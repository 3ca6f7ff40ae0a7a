"""Server-side staging for client streams, per-tenant quota overrides and a usage ledger.

Write, Log and Publish streams stage what they receive in UNLOGGED tables, one short
transaction per batch, keyed by a stream id; the stream's final transaction moves its rows into
place and deletes them from staging. A stream stays all or nothing, yet holds no connection or
transaction while its client is idle. Staged rows of a stream that never finished (crash,
disconnect) are removed by the server when it starts and periodically, by age.

``tenant_quotas`` holds the admin's per-tenant overrides of the quota defaults in the settings
table; ``tenant_usage`` counts trajectory bytes as episodes are logged (the shared trajectory
table has no per-tenant size the catalog could give).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE UNLOGGED TABLE reference_staging (
            stream_id     uuid NOT NULL,
            seq           bigint NOT NULL,
            external_id   text NOT NULL,
            text          text NOT NULL,
            metadata      jsonb NOT NULL,
            embedding     vector NOT NULL,
            memory        bytea,
            memory_size   bigint NOT NULL,
            memory_crc32  bigint NOT NULL,
            content_hash  bytea NOT NULL,
            staged_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (stream_id, seq)
        )
        """
    )
    op.execute("ALTER TABLE reference_staging ALTER COLUMN memory SET STORAGE EXTERNAL")
    op.execute(
        """
        CREATE UNLOGGED TABLE episode_staging (
            stream_id            uuid NOT NULL,
            stream_seq           bigint NOT NULL,
            episode_id           text NOT NULL,
            bank                 text NOT NULL,
            model_fingerprint    text NOT NULL,
            proxy_version        bigint NOT NULL,
            prompt_ids           int4[] NOT NULL,
            response_ids         int4[] NOT NULL,
            n_decisions          integer NOT NULL,
            decision_position    int4[] NOT NULL,
            decision_token       int4[] NOT NULL,
            decision_llm_prob    float4[] NOT NULL,
            decision_rank        int4[] NOT NULL,
            decision_p_accept    float4[] NOT NULL,
            decision_accepted    bool[] NOT NULL,
            decision_rejections  int4[] NOT NULL,
            rewards              jsonb NOT NULL,
            hidden_states        bytea,
            staged_at            timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (stream_id, stream_seq)
        )
        """
    )
    op.execute(
        """
        CREATE UNLOGGED TABLE upload_chunks (
            upload_id  uuid NOT NULL,
            seq        integer NOT NULL,
            data       bytea NOT NULL,
            staged_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (upload_id, seq)
        )
        """
    )
    op.execute("ALTER TABLE upload_chunks ALTER COLUMN data SET STORAGE EXTERNAL")
    op.execute(
        """
        CREATE TABLE tenant_quotas (
            tenant_id  bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            name       text NOT NULL,
            value      bigint NOT NULL CHECK (value >= 0),
            PRIMARY KEY (tenant_id, name)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE tenant_usage (
            tenant_id         bigint PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
            trajectory_bytes  bigint NOT NULL DEFAULT 0
        )
        """
    )
    op.execute(
        "INSERT INTO tenant_usage (tenant_id, trajectory_bytes)"
        " SELECT tenant_id, sum(pg_column_size(e.*)) FROM trajectory_episodes e GROUP BY tenant_id"
    )


def downgrade() -> None:
    for table in ("tenant_usage", "tenant_quotas", "upload_chunks", "episode_staging", "reference_staging"):
        op.execute(f"DROP TABLE {table}")
