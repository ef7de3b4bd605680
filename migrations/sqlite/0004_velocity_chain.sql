-- The velocity count walks a customer's decisions newest first, from the account's
-- `last_decision` along `prev_id`, and stops at the window's start or at the rule's limit.
-- That replaces the index on (customer_id, created_ms): every decision wrote a page of it at
-- a random place, where the chain adds nothing but two integers to pages already written.
-- `id` is declared, so that a VACUUM keeps the links.
CREATE TABLE decisions_linked (
    id           INTEGER PRIMARY KEY,
    prev_id      INTEGER,
    request_id   TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    payee_id     TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    currency     TEXT NOT NULL,
    decision     TEXT NOT NULL,
    reasons      TEXT NOT NULL,
    created_ms   INTEGER NOT NULL
) STRICT;
INSERT INTO decisions_linked (id, prev_id, request_id, customer_id, payee_id, amount_minor,
                              currency, decision, reasons, created_ms)
SELECT rowid, lag(rowid) OVER (PARTITION BY customer_id ORDER BY rowid), request_id,
       customer_id, payee_id, amount_minor, currency, decision, reasons, created_ms
FROM decisions ORDER BY rowid;
DROP TABLE decisions;
ALTER TABLE decisions_linked RENAME TO decisions;

ALTER TABLE accounts ADD COLUMN last_decision INTEGER;
UPDATE accounts SET last_decision = newest.id
FROM (SELECT customer_id, max(id) AS id FROM decisions GROUP BY customer_id) AS newest
WHERE newest.customer_id = accounts.customer_id;
