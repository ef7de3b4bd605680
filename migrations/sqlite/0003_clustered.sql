-- Accounts and reservations are found by their primary key: stored WITHOUT ROWID, each is
-- one B-tree keyed by it, instead of a table plus an index from the key to the row. A
-- reservation's UUIDv7 id grows with time, so new rows still append.
CREATE TABLE accounts_by_id (
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
) STRICT, WITHOUT ROWID;
INSERT INTO accounts_by_id (customer_id, currency, balance_minor, reserved_minor, outflow_day,
                            outflow_minor, recent_disputes, device_change, home_country)
SELECT customer_id, currency, balance_minor, reserved_minor, outflow_day,
       outflow_minor, recent_disputes, device_change, home_country FROM accounts;
DROP TABLE accounts;
ALTER TABLE accounts_by_id RENAME TO accounts;

CREATE TABLE reservations_by_id (
    id           TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL,
    payee_id     TEXT NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency     TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'held',
    request_id   TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    settled_ms   INTEGER
) STRICT, WITHOUT ROWID;
INSERT INTO reservations_by_id (id, customer_id, payee_id, amount_minor, currency, status,
                                request_id, created_ms, settled_ms)
SELECT id, customer_id, payee_id, amount_minor, currency, status,
       request_id, created_ms, settled_ms FROM reservations;
DROP TABLE reservations;
ALTER TABLE reservations_by_id RENAME TO reservations;
CREATE INDEX reservations_held ON reservations (created_ms) WHERE status = 'held';
