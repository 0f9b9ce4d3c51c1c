#!/bin/sh
# Nightly online backup of a Writ server's data directory (run by deploy/writ-backup.service,
# or `docker exec writ writ-backup.sh`; docs/operations.md, "Backups"). Safe while
# `writ serve` is running and writing.
#
#   1. SQLite's online backup API copies ledger.db as of one transaction (through Python's
#      sqlite3 module, so that no sqlite3 CLI is needed; `sqlite3 ledger.db ".backup FILE"`
#      is the same thing by hand). A plain `cp` is NOT safe: the ledger runs in WAL mode,
#      so the newest commits live in ledger.db-wal until a checkpoint folds them in.
#   2. The copy is switched to a self-contained rollback journal (no -wal/-shm needed),
#      checked by SQLite (`PRAGMA integrity_check`), then audited record by record from
#      genesis against the anchor in server.json (`writ audit --data`). Only a copy that
#      passes both becomes ledger-YYYYMMDD.db; a failure exits non-zero (the unit fails:
#      alert on it) and leaves the previous backups alone.
#   3. server.json and log.key are copied alongside when they differ (they never change
#      after `writ server init`); log.key stays 0600. (server.lock is not data.)
#   4. Backups older than WRIT_BACKUP_KEEP_DAYS days are deleted.
#
# Settings (environment; deploy/writ.env): WRIT_DATA, WRIT_BACKUP_DIR, WRIT_BACKUP_KEEP_DAYS,
# WRIT_BIN (the `writ` executable), WRIT_PYTHON (the python3 that has Writ installed).
set -eu

DATA=${WRIT_DATA:-/var/lib/writ}
DEST=${WRIT_BACKUP_DIR:-/var/backups/writ}
KEEP_DAYS=${WRIT_BACKUP_KEEP_DAYS:-30}
WRIT=${WRIT_BIN:-/opt/writ/.venv/bin/writ}
PYTHON=${WRIT_PYTHON:-$(dirname "$WRIT")/python3}

umask 077
mkdir -p "$DEST"
stamp=$(date -u +%Y%m%d)
work="$DEST/.incoming-$stamp-$$"
trap 'rm -rf "$work"' EXIT INT TERM
mkdir "$work"

anchor=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["anchor"])' "$DATA/server.json")

"$PYTHON" - "$DATA/ledger.db" "$work/ledger.db" <<'PY'
import sqlite3
import sys

src = sqlite3.connect(sys.argv[1], timeout=30)
dst = sqlite3.connect(sys.argv[2])
src.backup(dst)  # all pages in one step: one consistent snapshot
src.close()
dst.execute("PRAGMA journal_mode = DELETE")
check = dst.execute("PRAGMA integrity_check").fetchall()
dst.close()
if check != [("ok",)]:
    sys.exit(f"writ-backup: integrity_check failed on the copy: {check[:5]}")
PY
"$WRIT" audit --data "$work" --anchor "$anchor" --json >"$work/audit.json"

mv "$work/audit.json" "$DEST/ledger-$stamp.audit.json"
mv "$work/ledger.db" "$DEST/ledger-$stamp.db"
for f in server.json log.key; do
    if ! cmp -s "$DATA/$f" "$DEST/$f" 2>/dev/null; then
        cp -p "$DATA/$f" "$DEST/.$f.tmp"
        mv "$DEST/.$f.tmp" "$DEST/$f"
    fi
done
chmod 600 "$DEST/log.key"

find "$DEST" -maxdepth 1 -type f \( -name 'ledger-*.db' -o -name 'ledger-*.audit.json' \) \
    -mtime +"$KEEP_DAYS" -delete

echo "writ-backup: $DEST/ledger-$stamp.db: $(cat "$DEST/ledger-$stamp.audit.json")"
