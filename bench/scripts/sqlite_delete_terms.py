"""What one extra term in a SQLite DELETE's condition costs (bench/results/cleanup.md,
2026-12-04 evening). Deletes the expired sessions of a seeded database in key ranges of
2,000 rows, once per condition, each on a fresh copy of the database.

    DATABASE_URL=sqlite:///tmp/plan.db sessionfleet seed-demo --sessions 200000
    python3 bench/scripts/sqlite_delete_terms.py /tmp/plan.db '2026-12-04 18:00:00'
"""

import os
import shutil
import sqlite3
import sys
import time

SOURCE, CUTOFF = sys.argv[1], sys.argv[2]
COPY = SOURCE + ".bench"
STEP = 2000


def fresh_copy():
    for ext in ("", "-wal", "-shm"):
        if os.path.exists(SOURCE + ext):
            shutil.copy(SOURCE + ext, COPY + ext)
        elif os.path.exists(COPY + ext):
            os.remove(COPY + ext)


def delete_in_ranges(name, condition, args):
    fresh_copy()
    c = sqlite3.connect(COPY, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    lo, hi = c.execute("SELECT MIN(id), MAX(id) FROM user_sessions").fetchone()
    started, deleted, after = time.time(), 0, lo - 1
    while after < hi:
        c.execute("BEGIN IMMEDIATE")
        deleted += c.execute(
            f"DELETE FROM user_sessions WHERE id > ? AND id <= ? AND ({condition})",
            (after, after + STEP) + args,
        ).rowcount
        c.execute("COMMIT")
        after += STEP
    c.close()
    print(f"{name}: {deleted} rows in {time.time() - started:.2f} s")


julian = sqlite3.connect(":memory:").execute("SELECT julianday(?)", (CUTOFF,)).fetchone()[0]
delete_in_ranges("plain", "expires_at < ?", (CUTOFF,))
delete_in_ranges("julianday, number bound", "expires_at < ? AND julianday(expires_at) < ?", (CUTOFF, julian))
delete_in_ranges("typeof", "expires_at < ? AND typeof(expires_at) = 'text'", (CUTOFF,))
delete_in_ranges("julianday both", "expires_at < ? AND julianday(expires_at) < julianday(?)", (CUTOFF, CUTOFF))
delete_in_ranges("plain", "expires_at < ?", (CUTOFF,))
for ext in ("", "-wal", "-shm"):
    if os.path.exists(COPY + ext):
        os.remove(COPY + ext)
