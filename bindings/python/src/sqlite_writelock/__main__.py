"""python -m sqlite_writelock — protect unmodified programs.

  python -m sqlite_writelock run SCRIPT.py [ARGS…]   run a script with install() done first
  python -m sqlite_writelock run -m MODULE [ARGS…]   the same for a module (like python -m)
  python -m sqlite_writelock path                    print the extension's shared library
  python -m sqlite_writelock status DB               print writelock_status() of a read-only
                                                     connection to DB (creates nothing)
"""

import json
import os
import runpy
import sys

import sqlite_writelock


def _usage(code):
    sys.stderr.write(__doc__.split("\n", 2)[2])
    return code


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        return _usage(0 if args else 2)
    cmd, rest = args[0], args[1:]
    if cmd == "path":
        print(sqlite_writelock.path())
        return 0
    if cmd == "status":
        if len(rest) != 1:
            return _usage(2)
        import sqlite3
        import urllib.parse

        db = rest[0]
        # A question creates nothing: no database, no lock file (a read-only
        # connection takes no lock, so the extension creates no <db>.lock).
        if not os.path.isfile(db):
            what = "not a regular file" if os.path.exists(db) else "no such file"
            sys.stderr.write("sqlite_writelock: no database at %s (%s)\n" % (db, what))
            return 1
        sqlite_writelock.install()
        uri = "file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(db))
        try:
            con = sqlite3.connect(uri, uri=True)
        except sqlite3.Error as e:
            sys.stderr.write("sqlite_writelock: cannot open %s: %s\n" % (db, e))
            return 1
        try:
            print(json.dumps(sqlite_writelock.status(con), indent=2, sort_keys=True))
        finally:
            con.close()
        return 0
    if cmd == "run":
        if not rest:
            return _usage(2)
        sqlite_writelock.install()
        if rest[0] == "-m":
            if len(rest) < 2:
                return _usage(2)
            # sys.path[0] is already the working directory, as for python -m.
            sys.argv = [rest[1]] + rest[2:]
            runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
        else:
            script = rest[0]
            sys.argv = list(rest)
            # As `python script.py` does: the script's directory comes first.
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
        return 0
    sys.stderr.write("sqlite_writelock: unknown command %r\n" % cmd)
    return _usage(2)


if __name__ == "__main__":
    sys.exit(main())
