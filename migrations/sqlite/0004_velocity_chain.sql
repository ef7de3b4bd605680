-- The velocity count walks a customer's decisions newest first, from the account's
-- `last_decision` along `prev_id`, and stops at the rule's limit or where no earlier
-- decision can be in the window: `newest_ms` is the latest `created_ms` of the decision and
-- of every one before it in the chain (requests may commit in another order than they
-- started). That replaces the index on (customer_id, created_ms): every decision wrote a
-- page of it at a random place, where the chain adds a few integers to pages written anyway.
-- `id` is declared, so that a VACUUM keeps the links.
CREATE TABLE decisions_linked (
    id           INTEGER PRIMARY KEY,
    prev_id      INTEGER,
    newest_ms    INTEGER NOT NULL,
    request_id   TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    payee_id     TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    currency     TEXT NOT NULL,
    decision     TEXT NOT NULL,
    reasons      TEXT NOT NULL,
    created_ms   INTEGER NOT NULL
) STRICT;
INSERT INTO decisions_linked (id, prev_id, newest_ms, request_id, customer_id, payee_id,
                              amount_minor, currency, decision, reasons, created_ms)
SELECT rowid, lag(rowid) OVER chain, max(created_ms) OVER chain, request_id, customer_id,
       payee_id, amount_minor, currency, decision, reasons, created_ms
FROM decisions
WINDOW chain AS (PARTITION BY customer_id ORDER BY rowid)
ORDER BY rowid;
DROP TABLE decisions;
ALTER TABLE decisions_linked RENAME TO decisions;

-- The newest decision of the customer and the `newest_ms` it carries.
ALTER TABLE accounts ADD COLUMN last_decision INTEGER;
ALTER TABLE accounts ADD COLUMN last_decision_ms INTEGER;
UPDATE accounts SET last_decision = newest.id, last_decision_ms = newest.at
FROM (SELECT customer_id, max(id) AS id, max(created_ms) AS at
      FROM decisions GROUP BY customer_id) AS newest
WHERE newest.customer_id = accounts.customer_id;
