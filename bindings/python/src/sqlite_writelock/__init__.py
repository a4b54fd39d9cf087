"""sqlite-writelock for Python's ``sqlite3``.

sqlite-writelock is a SQLite extension: a VFS shim, ``writelock``, that holds an
exclusive ``flock()`` on ``<database>.lock`` while a connection writes, so
writers in different processes (and clients: the sqlite3 shell, Rust, Node, …)
exclude each other even when SQLite's own POSIX locks were silently dropped.

Load it once per process, *before* opening the connections to protect::

    import sqlite3
    import sqlite_writelock

    sqlite_writelock.install()
    con = sqlite3.connect("app.db")      # protected

* :func:`install` — make ``writelock`` the default VFS for this process's
  ``sqlite3`` module. Works whether or not the interpreter has
  ``sqlite3.Connection.enable_load_extension``.
* :func:`load` — load it through one connection (the ``sqlite_vec.load(db)``
  convention). Only connections opened afterwards are protected.
* :func:`path` — the shared library (``$WRITELOCK_PATH`` overrides), for other
  clients: ``sqlite3 -cmd ".load $(python -m sqlite_writelock path)" …``.
* ``python -m sqlite_writelock run script.py ARGS…`` (or ``run -m module``)
  runs an unmodified program with :func:`install` done first.
"""

import ctypes
import gc
import glob
import json
import os
import sqlite3
import sys
import threading
import warnings

__all__ = [
    "ENTRY_POINT",
    "WritelockError",
    "WritelockWarning",
    "install",
    "installed",
    "load",
    "path",
    "status",
]

#: The extension's entry point.
ENTRY_POINT = "sqlite3_writelock_init"

_lock = threading.RLock()
_installed_how = None


class WritelockError(RuntimeError):
    """The extension could not be loaded into this process's SQLite."""


class WritelockWarning(UserWarning):
    """A connection that the caller may believe protected is not."""


def path():
    """The extension's shared library: ``$WRITELOCK_PATH`` if set, else the
    copy inside this package."""
    env = os.environ.get("WRITELOCK_PATH")
    if env:
        if not os.path.isfile(env):
            raise WritelockError("WRITELOCK_PATH=%r is not a file" % env)
        return os.path.abspath(env)
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_writelock*.so")))
    found += sorted(glob.glob(os.path.join(here, "libwritelock*.so")))
    if not found:
        raise WritelockError(
            "the extension library is missing from %s; reinstall the package "
            "(pip install --force-reinstall sqlite-writelock) or set WRITELOCK_PATH "
            "to a libwritelock.so" % here
        )
    return found[0]


def installed():
    """How :func:`install` loaded the extension (``"enable_load_extension"``,
    ``"ctypes"`` or ``"already loaded"``), or ``None`` if it has not run in
    this process."""
    return _installed_how


def install():
    """Register VFS ``writelock`` as the default VFS of the SQLite library that
    the stdlib ``sqlite3`` module uses, for the whole process. Idempotent.

    Connections opened afterwards are protected; connections opened before are
    not: a :class:`WritelockWarning` names the database files of those it can
    find (open ``sqlite3.Connection`` objects of this thread with a file
    open; a connection of another thread cannot be asked which files it
    has). Uses ``enable_load_extension`` where the interpreter has it; otherwise
    loads the extension through ctypes into the same libsqlite3 that
    ``_sqlite3`` is linked to. Raises :class:`WritelockError` when neither is
    possible (SQLite linked statically into ``_sqlite3`` without extension
    loading), saying what to do instead.

    Returns how it loaded: ``"enable_load_extension"``, ``"ctypes"``, or
    ``"already loaded"`` (into this SQLite, by :func:`load` or other code).
    """
    global _installed_how
    with _lock:
        if _installed_how is not None:
            return _installed_how
        so = path()
        # SQLITE_WRITELOCK_LOADER=ctypes|enable_load_extension forces one way
        # (for tests and debugging); unset, the interpreter decides.
        forced = os.environ.get("SQLITE_WRITELOCK_LOADER", "")
        if forced not in ("", "ctypes", "enable_load_extension"):
            raise WritelockError("SQLITE_WRITELOCK_LOADER=%r: use ctypes or enable_load_extension" % forced)
        can = hasattr(sqlite3.Connection, "enable_load_extension")
        con = sqlite3.connect(":memory:")
        try:
            if _has_functions(con):
                how = "already loaded"  # by load(), or by other code of this process
            elif forced == "enable_load_extension" or (can and not forced):
                _load_into(con, so)
                how = "enable_load_extension"
            else:
                _load_with_ctypes(so)
                how = "ctypes"
        finally:
            con.close()
        _verify(how)
        _installed_how = how
        _warn_about_existing_connections()
        return how


def load(conn):
    """Load the extension through ``conn`` (an open ``sqlite3.Connection``).

    As with any client, this registers VFS ``writelock`` as the default for
    the whole process (it stays loaded), so *connections opened afterwards*
    are protected. ``conn`` itself was opened before: its databases are **not**
    protected, and a :class:`WritelockWarning` says so when ``conn`` has a
    database file open. Load through a ``:memory:`` connection, or call
    :func:`install`, before opening your databases.

    On interpreters without ``enable_load_extension`` this falls back to
    :func:`install` (``conn`` then gets no SQL functions).
    """
    so = path()
    if hasattr(conn, "enable_load_extension"):
        _load_into(conn, so)
    else:
        install()
    _warn_if_unprotected(conn)


#: Why a connection without the extension's functions is not protected.
NOT_LOADED = (
    "not protected: the extension is not loaded into this connection (it was "
    "opened before sqlite_writelock.install() or load() ran in this process, "
    "or neither ran)"
)


def status(conn):
    """``writelock_status()`` of ``conn`` as a dict.

    If the extension is not loaded into ``conn`` (no function
    ``writelock_status``: the connection was opened before :func:`install` or
    :func:`load`), the dict says so instead of raising::

        {"loaded": False, "protected": False, "reason": "not protected: …",
         "databases": [{"schema": "main", "file": "/…/app.db", "protected": False}]}
    """
    try:
        return _status_of(conn)
    except sqlite3.OperationalError as e:
        if "no such function" not in str(e):
            raise
    return {
        "loaded": False,
        "protected": False,
        "reason": NOT_LOADED,
        "databases": [{"schema": s, "file": f, "protected": False} for s, f in _files_of(conn)],
    }


def _status_of(conn):
    """``writelock_status()`` of ``conn``, whatever its row_factory; raises
    ``sqlite3.OperationalError`` where the extension is not loaded."""
    cur = conn.cursor()
    try:
        cur.row_factory = None
        row = cur.execute("SELECT writelock_status()").fetchone()[0]
    finally:
        cur.close()
    return json.loads(row if isinstance(row, str) else bytes(row).decode())


def _files_of(conn):
    """``[(schema, file)]`` of the databases ``conn`` has open on a file."""
    cur = conn.cursor()
    try:
        cur.row_factory = None
        rows = cur.execute("PRAGMA database_list").fetchall()
    finally:
        cur.close()
    out = []
    for _, schema, file in rows:
        if isinstance(file, (bytes, bytearray)):
            file = os.fsdecode(bytes(file))
        if file:
            out.append((schema, file))
    return out


def _unprotected_files(conn):
    """``[(schema, file)]`` of the files ``conn`` has open without the lock."""
    doc = status(conn)
    return [(d["schema"], d["file"]) for d in doc.get("databases", []) if d.get("file") and not d.get("protected")]


def _has_functions(conn):
    try:
        conn.execute("SELECT writelock_version()").fetchall()
        return True
    except Exception:
        return False


def _load_into(conn, so):
    if _has_functions(conn):
        # Opened after the extension was loaded into this SQLite: the VFS is
        # registered already. (Loading again through the SQL function would
        # fail: SQLite refuses to redefine functions while a statement runs.)
        return
    conn.enable_load_extension(True)
    try:
        if sys.version_info >= (3, 12):
            conn.load_extension(so, entrypoint=ENTRY_POINT)
        else:
            # Connection.load_extension takes no entry point before 3.12;
            # the SQL function does.
            conn.execute("SELECT load_extension(?, ?)", (so, ENTRY_POINT)).fetchall()
    except Exception as e:
        raise WritelockError("sqlite_writelock: cannot load %s: %s" % (so, e)) from e
    finally:
        conn.enable_load_extension(False)


def _verify(how):
    """A fresh stdlib connection must see the extension, or it went into
    another SQLite than the one ``sqlite3`` uses."""
    con = sqlite3.connect(":memory:")
    try:
        doc = _status_of(con)
    except sqlite3.Error as e:
        raise WritelockError(
            "sqlite_writelock: the extension was loaded (%s) but connections of "
            "the sqlite3 module do not see it (%s): it went into a different "
            "SQLite library than the one _sqlite3 uses" % (how, e)
        ) from e
    finally:
        con.close()
    if doc.get("vfs") not in (None, "writelock"):
        raise WritelockError(
            "sqlite_writelock: loaded, but the default VFS is %r, not 'writelock'"
            % doc.get("vfs")
        )


_STATIC_HELP = (
    "Use a Python whose sqlite3 module has enable_load_extension (Debian/Ubuntu's "
    "/usr/bin/python3 has it; for pyenv: PYTHON_CONFIGURE_OPTS="
    "--enable-loadable-sqlite-extensions pyenv install VERSION), or one whose "
    "_sqlite3 links a shared libsqlite3; or load the extension into the SQLite "
    "that your program really uses, e.g. through the pysqlite3 package: "
    "sqlite_writelock.load(pysqlite3.connect(':memory:'))."
)


def _sqlite_library():
    """A ctypes handle whose symbols are the SQLite that ``_sqlite3`` calls.

    dlopen() of the already loaded ``_sqlite3`` returns the same handle, and
    dlsym() on it searches ``_sqlite3`` and then the libraries it was linked
    against, so the symbols found are those of the libsqlite3 instance the
    module uses, never a second copy.
    """
    import _sqlite3

    so = getattr(_sqlite3, "__file__", None)
    where = so or "the python executable (built-in _sqlite3)"
    try:
        lib = ctypes.CDLL(so) if so else ctypes.CDLL(None)
        lib.sqlite3_libversion
        lib.sqlite3_load_extension
        lib.sqlite3_enable_load_extension
    except (OSError, AttributeError) as e:
        raise WritelockError(
            "sqlite_writelock: this Python's sqlite3 module has no "
            "enable_load_extension, and no loadable SQLite library is visible "
            "from %s (%s): SQLite is probably linked into it statically or "
            "built without extension loading. %s" % (where, e, _STATIC_HELP)
        ) from e
    lib.sqlite3_libversion.restype = ctypes.c_char_p
    lib.sqlite3_libversion.argtypes = []
    version = lib.sqlite3_libversion().decode()
    if version != sqlite3.sqlite_version:
        raise WritelockError(
            "sqlite_writelock: the SQLite found from %s is %s but the sqlite3 "
            "module reports %s; refusing to load into what may be another copy. %s"
            % (where, version, sqlite3.sqlite_version, _STATIC_HELP)
        )
    return lib


def _load_with_ctypes(so):
    lib = _sqlite_library()
    vp = ctypes.c_void_p
    lib.sqlite3_open_v2.argtypes = [ctypes.c_char_p, ctypes.POINTER(vp), ctypes.c_int, ctypes.c_char_p]
    lib.sqlite3_open_v2.restype = ctypes.c_int
    lib.sqlite3_enable_load_extension.argtypes = [vp, ctypes.c_int]
    lib.sqlite3_enable_load_extension.restype = ctypes.c_int
    lib.sqlite3_load_extension.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(vp)]
    lib.sqlite3_load_extension.restype = ctypes.c_int
    lib.sqlite3_errmsg.argtypes = [vp]
    lib.sqlite3_errmsg.restype = ctypes.c_char_p
    lib.sqlite3_free.argtypes = [vp]
    lib.sqlite3_free.restype = None
    lib.sqlite3_close.argtypes = [vp]
    lib.sqlite3_close.restype = ctypes.c_int

    db = vp()
    SQLITE_OPEN_READWRITE, SQLITE_OPEN_CREATE = 0x2, 0x4
    rc = lib.sqlite3_open_v2(b":memory:", ctypes.byref(db), SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, None)
    try:
        if rc != 0:
            raise WritelockError("sqlite_writelock: sqlite3_open_v2(':memory:') failed: %d" % rc)
        rc = lib.sqlite3_enable_load_extension(db, 1)
        if rc != 0:
            raise WritelockError(
                "sqlite_writelock: sqlite3_enable_load_extension failed (%s). %s"
                % (lib.sqlite3_errmsg(db).decode(errors="replace"), _STATIC_HELP)
            )
        err = vp()
        rc = lib.sqlite3_load_extension(db, os.fsencode(so), ENTRY_POINT.encode(), ctypes.byref(err))
        if rc != 0:
            msg = ctypes.string_at(err.value).decode(errors="replace") if err.value else "code %d" % rc
            if err.value:
                lib.sqlite3_free(err)
            raise WritelockError("sqlite_writelock: cannot load %s: %s" % (so, msg))
    finally:
        if db.value:
            lib.sqlite3_close(db)


def _warn_if_unprotected(conn):
    try:
        unprotected = _unprotected_files(conn)
    except Exception:
        return
    if unprotected:
        names = ", ".join("%s (%s)" % (f, s) for s, f in unprotected)
        warnings.warn(
            "sqlite_writelock.load(): %s of this connection was opened before the "
            "extension was loaded and is NOT protected; connections opened from now "
            "on are. Load it (or call sqlite_writelock.install()) before opening "
            "your databases." % names,
            WritelockWarning,
            stacklevel=3,
        )


def _existing_connections():
    """The ``sqlite3.Connection`` objects alive in this process (the garbage
    collector tracks them)."""
    try:
        return [o for o in gc.get_objects() if isinstance(o, sqlite3.Connection)]
    except Exception:
        return []


def _warn_about_existing_connections():
    """install() protects connections opened from now on: name the files of
    those already open, which stay unprotected until they are reopened."""
    files, conns = set(), 0
    for conn in _existing_connections():
        try:
            mine = _unprotected_files(conn)
        except Exception:
            # Closed, or made in another thread (check_same_thread): it cannot
            # be asked which files it has.
            continue
        if mine:
            conns += 1
            files.update(f for _, f in mine)
    if not files:
        return
    warnings.warn(
        "sqlite_writelock.install(): %d sqlite3 connection(s) opened before it are "
        "NOT protected: %s. Connections opened from now on are; close and reopen "
        "those, or call install() before opening your databases." % (conns, ", ".join(sorted(files))),
        WritelockWarning,
        stacklevel=3,
    )
