-- PostgreSQL schema, equivalent to migrations/sqlite/0001_init.sql, for many instances
-- sharing one database. Money is integer minor units (BIGINT), never a float.

-- Accounts: the balance side (what getBalance reads) and the risk side (getRiskSignals).
-- `reserved_minor` is held by reservations; `outflow_minor` counts what was reserved on the
-- UTC day `outflow_day`, for the daily limit. The CHECKs are the last line against a double
-- spend: no code path can hold more than the balance.
CREATE TABLE accounts (
    customer_id     TEXT PRIMARY KEY,
    currency        TEXT NOT NULL,
    balance_minor   BIGINT NOT NULL CHECK (balance_minor >= 0),
    reserved_minor  BIGINT NOT NULL DEFAULT 0
                    CHECK (reserved_minor >= 0 AND reserved_minor <= balance_minor),
    outflow_day     BIGINT NOT NULL DEFAULT 0,
    outflow_minor   BIGINT NOT NULL DEFAULT 0 CHECK (outflow_minor >= 0),
    recent_disputes INTEGER NOT NULL DEFAULT 0,
    device_change   BOOLEAN NOT NULL DEFAULT FALSE,
    home_country    TEXT
);

CREATE TABLE known_payees (
    customer_id TEXT NOT NULL,
    payee_id    TEXT NOT NULL,
    PRIMARY KEY (customer_id, payee_id)
);

CREATE TABLE reservations (
    id           TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL,
    payee_id     TEXT NOT NULL,
    amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
    currency     TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'held',
    request_id   TEXT NOT NULL,
    created_ms   BIGINT NOT NULL
);

CREATE TABLE cases (
    id           TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL,
    payee_id     TEXT NOT NULL,
    amount_minor BIGINT NOT NULL,
    currency     TEXT NOT NULL,
    decision     TEXT NOT NULL,
    reasons      JSONB NOT NULL,
    trace        JSONB NOT NULL,
    status       TEXT NOT NULL DEFAULT 'open',
    request_id   TEXT NOT NULL,
    created_ms   BIGINT NOT NULL
);

-- Every decision made (replays excluded): the audit log and the velocity counter.
CREATE TABLE decisions (
    request_id   TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    payee_id     TEXT NOT NULL,
    amount_minor BIGINT NOT NULL,
    currency     TEXT NOT NULL,
    decision     TEXT NOT NULL,
    reasons      JSONB NOT NULL,
    created_ms   BIGINT NOT NULL
);
CREATE INDEX decisions_by_customer ON decisions (customer_id, created_ms);

-- Idempotency keys, shared by every instance. A row is either
-- * `in_progress`: an instance (`owner`, a random token per request) is deciding; the key is
--   blocked until `expires_ms`, the claim's lease. A crashed instance never releases its
--   claim, so after the lease anyone may take the key over; the owner token fences the old
--   execution out of commit.
-- * `completed`: the stored response, replayed byte for byte until `expires_ms`.
CREATE TABLE idempotency (
    caller      TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
    owner       TEXT,
    status_code INTEGER,
    body        BYTEA,
    request_id  TEXT,
    created_ms  BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL,
    PRIMARY KEY (caller, key),
    CHECK ((state = 'in_progress' AND owner IS NOT NULL)
        OR (state = 'completed' AND status_code IS NOT NULL AND body IS NOT NULL
            AND request_id IS NOT NULL))
);
CREATE INDEX idempotency_by_expiry ON idempotency (expires_ms);
