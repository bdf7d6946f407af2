-- apipool-server schema (SQLite). Booleans are INTEGER 0/1 and timestamps are unix milliseconds
-- so that the same queries run on SQLite and PostgreSQL through sqlx's Any driver.
CREATE TABLE users (
    id TEXT PRIMARY KEY NOT NULL,
    username TEXT NOT NULL UNIQUE,
    email TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    is_active INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE refresh_tokens (
    id TEXT PRIMARY KEY NOT NULL,
    family_id TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX refresh_tokens_family ON refresh_tokens(family_id);
CREATE INDEX refresh_tokens_user ON refresh_tokens(user_id);

CREATE TABLE vault_master_keys (
    version INTEGER PRIMARY KEY NOT NULL,
    check_value TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    handoff_from INTEGER,
    handoff_nonce BLOB,
    handoff_ciphertext BLOB,
    created_at INTEGER NOT NULL
);

CREATE TABLE vault_secrets (
    name TEXT PRIMARY KEY NOT NULL,
    ciphertext BLOB NOT NULL,
    nonce BLOB NOT NULL,
    wrapped_dek BLOB NOT NULL,
    dek_nonce BLOB NOT NULL,
    master_version INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    identifier TEXT NOT NULL,
    alias TEXT,
    description TEXT,
    client_config TEXT,
    tags TEXT NOT NULL,
    is_active INTEGER NOT NULL DEFAULT 1,
    is_archived INTEGER NOT NULL DEFAULT 0,
    verification_status TEXT NOT NULL,
    last_verified_at INTEGER,
    fingerprint TEXT NOT NULL,
    ciphertext BLOB NOT NULL,
    nonce BLOB NOT NULL,
    wrapped_dek BLOB NOT NULL,
    dek_nonce BLOB NOT NULL,
    master_version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (user_id, identifier)
);
CREATE INDEX api_keys_fingerprint ON api_keys(user_id, fingerprint);
CREATE INDEX api_keys_master_version ON api_keys(master_version);

CREATE TABLE api_key_tags (
    key_id TEXT NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (key_id, tag)
);
CREATE INDEX api_key_tags_user_tag ON api_key_tags(user_id, tag);

CREATE TABLE pools (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    identifier TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    client_type TEXT NOT NULL,
    reach_limit_exception TEXT,
    rotation_strategy TEXT NOT NULL,
    pool_config TEXT,
    upstream TEXT,
    is_active INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (user_id, identifier)
);

CREATE TABLE pool_members (
    pool_id TEXT NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
    key_id TEXT NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    priority INTEGER NOT NULL DEFAULT 0,
    weight INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (pool_id, key_id)
);
CREATE INDEX pool_members_key ON pool_members(key_id);
