-- The record store (§6). Same schema as ../sqlite/0001_records.sql.

-- Every record: roots (parent_id NULL, with their source) and their
-- children (parent_id set, association named). fields is a JSON object.
CREATE TABLE records (
    id BIGSERIAL PRIMARY KEY,
    parent_id BIGINT REFERENCES records (id),
    association TEXT,
    module TEXT NOT NULL,
    business_object TEXT NOT NULL,
    fields TEXT NOT NULL,
    topic TEXT,
    dedupe_key TEXT,
    mail_config TEXT,
    mailbox TEXT,
    message_id TEXT,
    sender TEXT,
    subject TEXT,
    received_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX records_parent ON records (parent_id);
CREATE INDEX records_created ON records (created_at);

-- Rejected messages, with their reason; dead_lettered once the
-- dead-letter exchange confirmed the copy.
CREATE TABLE failures (
    id BIGSERIAL PRIMARY KEY,
    dedupe_key TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    topic TEXT,
    mail_config TEXT,
    mailbox TEXT,
    message_id TEXT,
    sender TEXT,
    subject TEXT,
    received_at BIGINT,
    dead_lettered BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE INDEX failures_key ON failures (dedupe_key);

-- One row per dedupe key ever settled: a record or a failure. The primary
-- key makes a message count once.
CREATE TABLE processed (
    dedupe_key TEXT PRIMARY KEY,
    record_id BIGINT,
    failure_id BIGINT,
    created_at BIGINT NOT NULL
);

-- Values of the topics' unique fields: a second record with the same value
-- is a rejected duplicate.
CREATE TABLE unique_values (
    business_object TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    record_id BIGINT NOT NULL,
    PRIMARY KEY (business_object, field, value)
);
