-- Accounts: the balance side (what getBalance reads) and the risk side (getRiskSignals).
-- `reserved_minor` is held by reservations; `outflow_minor` counts what was reserved on the
-- UTC day `outflow_day`, for the daily limit.
CREATE TABLE accounts (
    customer_id     TEXT PRIMARY KEY,
    currency        TEXT NOT NULL,
    balance_minor   INTEGER NOT NULL CHECK (balance_minor >= 0),
    reserved_minor  INTEGER NOT NULL DEFAULT 0
                    CHECK (reserved_minor >= 0 AND reserved_minor <= balance_minor),
    outflow_day     INTEGER NOT NULL DEFAULT 0,
    outflow_minor   INTEGER NOT NULL DEFAULT 0 CHECK (outflow_minor >= 0),
    recent_disputes INTEGER NOT NULL DEFAULT 0,
    device_change   INTEGER NOT NULL DEFAULT 0,
    home_country    TEXT
) STRICT;

CREATE TABLE known_payees (
    customer_id TEXT NOT NULL,
    payee_id    TEXT NOT NULL,
    PRIMARY KEY (customer_id, payee_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE reservations (
    id           TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL,
    payee_id     TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency     TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'held',
    request_id   TEXT NOT NULL,
    created_ms   INTEGER NOT NULL
) STRICT;

CREATE TABLE cases (
    id           TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL,
    payee_id     TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    currency     TEXT NOT NULL,
    decision     TEXT NOT NULL,
    reasons      TEXT NOT NULL,
    trace        TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'open',
    request_id   TEXT NOT NULL,
    created_ms   INTEGER NOT NULL
) STRICT;

-- Every decision made (replays excluded): the audit log and the velocity counter.
CREATE TABLE decisions (
    request_id   TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    payee_id     TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    currency     TEXT NOT NULL,
    decision     TEXT NOT NULL,
    reasons      TEXT NOT NULL,
    created_ms   INTEGER NOT NULL
) STRICT;
CREATE INDEX decisions_by_customer ON decisions (customer_id, created_ms);

-- Stored responses, replayed byte for byte for the same caller and key.
CREATE TABLE idempotency (
    caller      TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    status_code INTEGER NOT NULL,
    body        BLOB NOT NULL,
    request_id  TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    PRIMARY KEY (caller, key)
) STRICT;
CREATE INDEX idempotency_by_expiry ON idempotency (expires_ms);
