-- A reservation updates its account's reserved and outflow columns, which no index covers:
-- with room left on the row's page, PostgreSQL writes the new version there (a HOT update)
-- and touches no index. Pages filled to the brim leave no such room.
ALTER TABLE accounts SET (fillfactor = 70);
