-- Case review and the reservation lifecycle.
ALTER TABLE cases ADD COLUMN resolved_ms BIGINT;
ALTER TABLE cases ADD COLUMN resolution_note TEXT;
ALTER TABLE cases ADD COLUMN reservation_id TEXT;
ALTER TABLE reservations ADD COLUMN settled_ms BIGINT;
CREATE INDEX cases_by_status ON cases (status, created_ms);
-- The expiry sweep looks for old held reservations only.
CREATE INDEX reservations_held ON reservations (created_ms) WHERE status = 'held';
