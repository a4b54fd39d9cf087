"""``import sqlite_writelock.auto`` — :func:`sqlite_writelock.install` at
interpreter start-up, for a ``sitecustomize.py`` or a ``.pth`` line.

A failure stops the interpreter (``SystemExit``, which ``site`` does not
swallow) instead of letting every program run unprotected.
"""

import sqlite_writelock

try:
    sqlite_writelock.install()
except sqlite_writelock.WritelockError as e:
    raise SystemExit("sqlite_writelock: refusing to run unprotected: %s" % e)
