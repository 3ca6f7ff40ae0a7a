"""Trajectories of the proxy policy and the proxy registry.

Episodes: one row per episode, its decisions stored column-wise as parallel arrays in the same
row (position, token, llm_prob, rank, p_accept, accepted, rejections). Why not one row per
decision: a decision is ~23 bytes of payload, so a row per decision would be mostly tuple header
(24 bytes) and index entries; readers always want whole episodes (the trainer replays an episode
at a time), and the arrays are still SQL (``unnest``) for ad-hoc analysis. Large arrays are
TOASTed and compressed by PostgreSQL. ``seq`` is the log order and the Read cursor; a Log
transaction takes a per-tenant lock just before it assigns seqs, so seqs of one tenant are
assigned in commit order and a cursor never skips a row committed later with a smaller seq.
``episode_id`` is the client's id and the deduplication key per tenant.

Proxies: safetensors weights in a bytea stored EXTERNAL (uncompressed out of line: weights do
not compress, and ``substring`` on an EXTERNAL value reads only the TOAST chunks it needs, so Get
streams a large proxy without loading it whole). Versions count per (tenant, name).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE trajectory_episodes (
            seq                  bigserial PRIMARY KEY,
            tenant_id            bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            episode_id           text NOT NULL,
            bank                 text NOT NULL DEFAULT '',
            model_fingerprint    text NOT NULL,
            proxy_version        bigint NOT NULL,
            logged_at            timestamptz NOT NULL DEFAULT now(),
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
            rewards              jsonb NOT NULL DEFAULT '{}'::jsonb,
            hidden_states        bytea,
            UNIQUE (tenant_id, episode_id)
        )
        """
    )
    op.execute("ALTER TABLE trajectory_episodes ALTER COLUMN hidden_states SET STORAGE EXTERNAL")
    op.execute("CREATE INDEX trajectory_episodes_read ON trajectory_episodes (tenant_id, seq)")
    op.execute(
        "CREATE INDEX trajectory_episodes_proxy ON trajectory_episodes (tenant_id, proxy_version, seq)"
    )
    op.execute(
        """
        CREATE TABLE proxies (
            id                 bigserial PRIMARY KEY,
            tenant_id          bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            name               text NOT NULL,
            version            bigint NOT NULL CHECK (version >= 1),
            model_fingerprint  text NOT NULL,
            parent_version     bigint NOT NULL DEFAULT 0,
            metrics            jsonb NOT NULL DEFAULT '{}'::jsonb,
            config_json        text NOT NULL DEFAULT '{}',
            weights            bytea NOT NULL,
            weights_size       bigint NOT NULL,
            weights_sha256     bytea NOT NULL,
            created_at         timestamptz NOT NULL DEFAULT now(),
            UNIQUE (tenant_id, name, version)
        )
        """
    )
    op.execute("ALTER TABLE proxies ALTER COLUMN weights SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.execute("DROP TABLE proxies")
    op.execute("DROP TABLE trajectory_episodes")
