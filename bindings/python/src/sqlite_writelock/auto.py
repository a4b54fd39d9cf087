"""``import sqlite_writelock.auto`` — :func:`sqlite_writelock.install` at
interpreter start-up, for a ``sitecustomize.py`` or a ``.pth`` line.

A failure stops the interpreter (``SystemExit``, which ``site`` does not
swallow) instead of letting every program run unprotected. The message says
which file asked for it and how to get out: a ``.pth`` stops *every* program
of its environment, pip included.
"""

import os
import sys

import sqlite_writelock


def _started_by():
    """("pth", path) when a ``.pth`` line of ``site`` is importing this
    module, ("sitecustomize"/"usercustomize", path) for those modules, else
    (None, None). Read from the call stack: ``site.addpackage`` has the
    ``.pth`` file's name in its locals."""
    try:
        f = sys._getframe(1)
    except (AttributeError, ValueError):
        return None, None
    while f is not None:
        g = f.f_globals
        if f.f_code.co_name == "addpackage" and g.get("__name__") == "site":
            loc = f.f_locals
            full = loc.get("fullname")
            if not full and loc.get("sitedir") and loc.get("name"):
                full = os.path.join(loc["sitedir"], loc["name"])
            if full:
                return "pth", full
        if g.get("__name__") in ("sitecustomize", "usercustomize"):
            return g["__name__"], g.get("__file__")
        f = f.f_back
    return None, None


def _owner(path):
    """The installed distribution whose RECORD lists ``path``, if any."""
    try:
        from importlib import metadata

        real = os.path.realpath(path)
        for dist in metadata.distributions():
            for f in dist.files or ():
                if str(f).endswith(os.path.basename(path)) and os.path.realpath(dist.locate_file(f)) == real:
                    return dist.metadata["Name"]
    except Exception:
        pass
    return None


def _how_to_get_out(error):
    kind, where = _started_by()
    site_dir = os.path.dirname(os.path.dirname(os.path.abspath(sqlite_writelock.__file__)))
    me = os.path.abspath(__file__)
    python = sys.executable or "python"
    lines = ["sqlite_writelock: refusing to run unprotected: %s" % error, ""]
    module = "sqlite_writelock.auto (%s, in site-packages %s)" % (me, site_dir)
    if kind:
        what = "the .pth file" if kind == "pth" else kind
        lines.append("This interpreter (%s) was stopped at start-up by %s\n  %s\nwhich imports %s."
                     % (python, what, where, module))
    else:
        lines.append("This program (%s) imported %s, which stops it." % (python, module))
    lines += ["", "To get out:"]
    if kind:
        lines.append(
            "  - run one command without site processing, which skips every .pth file and "
            "sitecustomize: %s -S ... (site-packages is then not on sys.path)" % python
        )
    if kind == "pth":
        owner = _owner(where)
        lines.append("  - or delete that file: rm '%s'" % where)
        if owner:
            lines.append(
                "    It belongs to the installed distribution %r, and `pip uninstall %s` would "
                "remove it, but pip cannot start while this file stops the interpreter: delete "
                "it first, then pip uninstall %s" % (owner, owner, owner)
            )
        else:
            lines.append(
                "    (`pip uninstall sqlite-writelock` removes a .pth only if the wheel shipped "
                "it; this one belongs to no installed distribution, it was written by "
                "hand, as in the README's recipe)"
            )
    elif kind:
        lines.append(
            "  - or remove the line `import sqlite_writelock.auto` from that file, or drop its "
            "directory from PYTHONPATH"
        )
    lines.append(
        "  - %sfix the cause above (a damaged install: pip install --force-reinstall sqlite-writelock)"
        % ("or " if kind else "")
    )
    return "\n".join(lines)


try:
    sqlite_writelock.install()
except sqlite_writelock.WritelockError as e:
    raise SystemExit(_how_to_get_out(e)) from None
