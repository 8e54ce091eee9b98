-- A registry written by loraplex at commit 61c18fc (schema version 1, the release before numbered
-- migrations), for tests/adapters_store/test_migrations.py. Made by that commit's own code: an
-- AdapterStore on a fresh directory published the three adapters of test_migrations.V1_ADAPTERS as
--   sum@1 (a), sum@2 (b), sum@3 (a, then deleted), sql@1 (a), tone@1 (c, a soft prompt)
-- and created the endpoint 'summary'; below are the DDL statements that commit ran (its
-- sql_tx.SCHEMA, verbatim) and every row it wrote, as portable INSERTs, so the same file loads
-- into SQLite and PostgreSQL. Never edit it: it stands for stores that exist.
CREATE TABLE IF NOT EXISTS store_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
CREATE TABLE IF NOT EXISTS adapter_names (
        name TEXT PRIMARY KEY,
        last_version BIGINT NOT NULL
    );
CREATE TABLE IF NOT EXISTS adapters (
        name TEXT NOT NULL REFERENCES adapter_names (name),
        version BIGINT NOT NULL,
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        metadata TEXT NOT NULL,
        PRIMARY KEY (name, version)
    );
CREATE INDEX IF NOT EXISTS adapters_by_digest ON adapters (digest);
CREATE TABLE IF NOT EXISTS endpoints (
        name TEXT PRIMARY KEY,
        adapter_name TEXT,
        adapter_version BIGINT,
        soft_prompt_name TEXT,
        soft_prompt_version BIGINT,
        canary_name TEXT,
        canary_version BIGINT,
        canary_weight DOUBLE PRECISION NOT NULL,
        template TEXT NOT NULL,
        system_message TEXT NOT NULL,
        defaults TEXT NOT NULL,
        max_new_tokens_cap BIGINT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        FOREIGN KEY (adapter_name, adapter_version) REFERENCES adapters (name, version),
        FOREIGN KEY (soft_prompt_name, soft_prompt_version) REFERENCES adapters (name, version),
        FOREIGN KEY (canary_name, canary_version) REFERENCES adapters (name, version)
    );
INSERT INTO store_meta (key, value) VALUES ('schema_version', '1');
INSERT INTO adapter_names (name, last_version) VALUES ('sql', 1);
INSERT INTO adapter_names (name, last_version) VALUES ('sum', 3);
INSERT INTO adapter_names (name, last_version) VALUES ('tone', 1);
INSERT INTO adapters (name, version, kind, digest, size_bytes, created_at, metadata) VALUES ('sql', 1, 'lora', 'dc47340916f6ddf5c17d8bf687979bd4ad12b3d10cad4175ea77ac8ef5461a8b', 45, 1796324407.6483486, '{"kind": "lora", "max_rank": 4, "ranks": {"q_proj": 4}, "warnings": []}');
INSERT INTO adapters (name, version, kind, digest, size_bytes, created_at, metadata) VALUES ('sum', 1, 'lora', 'dc47340916f6ddf5c17d8bf687979bd4ad12b3d10cad4175ea77ac8ef5461a8b', 45, 1796324407.6329217, '{"kind": "lora", "max_rank": 4, "ranks": {"q_proj": 4}, "warnings": []}');
INSERT INTO adapters (name, version, kind, digest, size_bytes, created_at, metadata) VALUES ('sum', 2, 'lora', '7fddc0c03b6f4ecc7038bd57e414f453440e4f0f4f0e2a681d03a65a5cbefc1d', 45, 1796324407.637454, '{"kind": "lora", "max_rank": 8, "ranks": {"q_proj": 8}, "warnings": []}');
INSERT INTO adapters (name, version, kind, digest, size_bytes, created_at, metadata) VALUES ('tone', 1, 'soft_prompt', '8d568aa7ab6b90e8f9cc47ff27b8dc1f18961f7b49fcf00f122a22f94c6196cc', 70, 1796324407.6535928, '{"kind": "soft_prompt", "num_virtual_tokens": 5, "warnings": []}');
INSERT INTO endpoints (name, adapter_name, adapter_version, soft_prompt_name, soft_prompt_version, canary_name, canary_version, canary_weight, template, system_message, defaults, max_new_tokens_cap, created_at, updated_at) VALUES ('summary', 'sum', 2, 'tone', 1, 'sum', 1, 0.1, 'Summarize: {input}', 'Be brief.', '{"temperature": 0.2}', 64, 1796324407.656473, 1796324407.656473);
