-- Writ ledger storage, schema version 2 (PRAGMA user_version = 2).
--
-- Applied once, atomically, to a new database by ledger/storage/sqlite.py,
-- which refuses to open a file whose user_version it does not know or whose
-- application_id is not Writ's ('Writ' = 0x57726974 = 1467115892).
--
-- `records` is the ledger: each record's bytes exactly as verified and
-- signed, and its RFC 6962 leaf hash. `head` is the single (size, root) row
-- every append compares-and-swaps. The records are the only truth (every
-- start re-verifies them); version 1 also kept `grants` and `revocations`
-- index tables, which sqlite.py's migration drops. Unsigned 64-bit protocol integers
-- (times, validity windows, reasons) are stored as two's-complement signed
-- 64-bit values, since SQLite integers are signed; the code maps them back.

BEGIN IMMEDIATE;

PRAGMA application_id = 1467115892;

CREATE TABLE IF NOT EXISTS meta (
    id             INTEGER PRIMARY KEY CHECK (id = 0),
    origin         TEXT    NOT NULL CHECK (typeof(origin) = 'text'),
    anchor         BLOB    NOT NULL CHECK (typeof(anchor) = 'blob' AND length(anchor) = 32),
    log_public_key BLOB    NOT NULL CHECK (typeof(log_public_key) = 'blob' AND length(log_public_key) = 32),
    created_at     INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS records (
    seq       INTEGER PRIMARY KEY CHECK (seq >= 0),
    raw       BLOB    NOT NULL CHECK (typeof(raw) = 'blob'),
    leaf_hash BLOB    NOT NULL CHECK (typeof(leaf_hash) = 'blob' AND length(leaf_hash) = 32)
);

CREATE TABLE IF NOT EXISTS head (
    id   INTEGER PRIMARY KEY CHECK (id = 0),
    size INTEGER NOT NULL CHECK (typeof(size) = 'integer' AND size >= 0),
    root BLOB    NOT NULL CHECK (typeof(root) = 'blob' AND length(root) = 32)
);

-- the latest receipt of each device (larger size wins; equal size: later time)
CREATE TABLE IF NOT EXISTS receipts (
    device_grant_seq INTEGER PRIMARY KEY CHECK (device_grant_seq >= 0),
    size             INTEGER NOT NULL CHECK (size >= 0),
    root             BLOB    NOT NULL CHECK (length(root) = 32),
    time             INTEGER NOT NULL,
    raw              BLOB    NOT NULL CHECK (typeof(raw) = 'blob'),
    received_at      INTEGER NOT NULL
);

-- the last signed checkpoint note, so a restarted server never goes back in time
CREATE TABLE IF NOT EXISTS checkpoint (
    id   INTEGER PRIMARY KEY CHECK (id = 0),
    size INTEGER NOT NULL CHECK (size >= 0),
    note TEXT    NOT NULL
);

PRAGMA user_version = 2;

COMMIT;
