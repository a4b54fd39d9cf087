"""The Python client of the cross-client tests (tests/clients.rs); the same
protocol as examples/src/bin/worker.rs.

    python worker.py DB CMD [N]                               # stock sqlite3
    python -m sqlite_writelock run worker.py DB CMD [N]       # protected, unmodified

It never imports sqlite_writelock: it is the "unmodified program".
CMD: status | hold | try | write N (see the Rust worker). Rows go to
t(client, i, ts); client is $WORKER_TAG (default "python").
"""

import os
import sqlite3
import sys

INSERT = "INSERT INTO t(client, i, ts) VALUES (?, ?, (julianday('now') - 2440587.5) * 86400000.0)"


def out(line):
    print(line, flush=True)


def main():
    db, cmd, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    tag = os.environ.get("WORKER_TAG", "python")
    # isolation_level=None: autocommit; the transactions below are explicit.
    con = sqlite3.connect(db, isolation_level=None, timeout=20)
    out("sqlite_version=" + con.execute("SELECT sqlite_version()").fetchone()[0])
    try:
        status = con.execute("SELECT writelock_status()").fetchone()[0]
    except sqlite3.Error as e:
        status = "missing: %s" % e
    out("status=" + status)
    if cmd == "status":
        pass
    elif cmd == "hold":
        con.execute("PRAGMA busy_timeout = 5000")
        con.execute("BEGIN IMMEDIATE")
        con.execute(INSERT, (tag, 0))
        out("holding")
        sys.stdin.readline()
        con.execute("COMMIT")
        out("committed")
    elif cmd == "try":
        con.execute("PRAGMA busy_timeout = 200")
        try:
            con.execute(INSERT, (tag, 0))
            out("ok")
        except sqlite3.Error as e:
            out("error=%s" % e)
    elif cmd == "write":
        n = int(rest[0])
        con.execute("PRAGMA busy_timeout = 20000")
        for i in range(n):
            con.execute("BEGIN IMMEDIATE")
            con.execute(INSERT, (tag, i))
            con.execute("COMMIT")
            if i == 0:
                out("writing")
        out("done=%d" % n)
    else:
        sys.exit("unknown command %r" % cmd)
    con.close()


if __name__ == "__main__":
    main()
