#!/usr/bin/env python3
"""`make test-dist`: install each artifact of dist/ the way a user would, into
fresh environments without cargo or rustc, and check that it works.

  python: a venv of Debian's /usr/bin/python3 (enable_load_extension) and one
          of the python3 on PATH (pyenv's, without it: install() goes through
          ctypes). The README's install line (bindings/snippets/python-dist.sh,
          `python -m pip install sqlite-writelock`) runs verbatim with pip
          limited to dist/ (PIP_NO_INDEX=1, PIP_FIND_LINKS=dist); then the
          Python snippet, the `writelock` command from the venv's bin/, a real
          lock between the two, the `.pth` recipe and the failure message of
          `import sqlite_writelock.auto`, and `pip uninstall`, after which
          the venv is as before and the interpreter starts cleanly.
  node:   a fresh npm project; the README's line (`npm install sqlite-writelock
          better-sqlite3@12`) runs verbatim against a local registry that
          serves dist/sqlite-writelock-<v>.tgz and passes every other package
          through to the real one (better-sqlite3 may build from source).
          Then the Node snippet, load()'s warning for an already open file,
          install(), ES module import and the TypeScript types.
  shell:  the tarball, extracted by the README's line into a temporary HOME's
          ~/.local; the sqlite3 shell loads lib/libwritelock and bin/writelock
          runs.
  rust:   (needs cargo, like any Rust user) `cargo package` of each crate is
          served as crates.io through source replacement, with the
          workspace's dependencies vendored: the README's `cargo add …` and
          `cargo install writelock-cli` run verbatim, then a program
          calling writelock::register() (bindings/snippets/rust-dist.rs).
  docs:   docs/install.md and the package READMEs quote every snippet
          verbatim and name no path into a checkout; README.md's Install
          section, right after `make demo` and `make test`, is lines of them.

Every check prints one line; the exit status is non-zero if any failed.
Scratch: target/dist-test/ (emptied first). TEST_DIST_ONLY=python,node,shell,rust,docs
runs a subset.
"""

import base64
import hashlib
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import traceback
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "dist"
WORK = REPO / "target" / "dist-test"
SNIPPETS = REPO / "bindings" / "snippets"
RELEASE = REPO / "target" / "release"

_spec = importlib.util.spec_from_file_location("dist_builder", REPO / "scripts" / "dist.py")
dist_builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dist_builder)

_print_lock = threading.Lock()
RESULTS = []  # (section, ok, what)


class Abort(Exception):
    """A step a section cannot go on without failed."""


def log(sec, msg):
    with _print_lock:
        print("[%s] %s" % (sec, msg), flush=True)


def check(sec, cond, what, detail=""):
    cond = bool(cond)
    with _print_lock:
        RESULTS.append((sec, cond, what))
        line = "[%s] %s %s" % (sec, "ok  " if cond else "FAIL", what)
        if not cond and detail:
            line += "\n" + textwrap.indent(str(detail).rstrip(), "       | ")
        print(line, flush=True)
    return cond


def output(p):
    return "exit %s\n--- stdout\n%s--- stderr\n%s" % (p.returncode, p.stdout, p.stderr)


def run(sec, argv, cwd, env, ok=True, timeout=900, quiet=False):
    argv = [str(a) for a in argv]
    if not quiet:
        log(sec, "$ %s   (in %s)" % (shlex.join(argv), rel(cwd)))
    try:
        p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Abort("%s: %s" % (shlex.join(argv), e))
    if ok and p.returncode != 0:
        raise Abort("%s failed:\n%s" % (shlex.join(argv), output(p)))
    return p


def rel(p):
    p = Path(p)
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snippet(name):
    p = SNIPPETS / name
    if not p.is_file():
        raise Abort("%s is missing" % rel(p))
    return p


def json_objects(text):
    """Every line of ``text`` that is a JSON object."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
    return found


def main_db(status):
    return next((d for d in status.get("databases", []) if d.get("schema") == "main"), {})


def check_protected(sec, what, status, db_file):
    d = main_db(status)
    check(sec, d.get("protected") is True and status.get("vfs") == "writelock"
          and Path(d.get("file") or "/nonexistent") == Path(db_file).resolve(),
          '%s: "protected": true for %s' % (what, rel(db_file)), json.dumps(status))


# ---- the environment of a user without Rust -------------------------------------------

_DROP = ("CARGO", "RUSTUP", "RUSTC", "RUSTFLAGS", "RUST_", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
         "WRITELOCK", "SQLITE_WRITELOCK", "PIP_", "npm_", "NODE_PATH", "NODE_OPTIONS",
         "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")


def _has_rust(d):
    return any(os.access(os.path.join(d, t), os.X_OK) for t in ("cargo", "rustc", "rustup"))


def clean_env(first=()):
    """os.environ without Rust: no directory holding cargo/rustc/rustup on
    PATH (~/.cargo/bin), no CARGO_*/RUSTUP_*; nor anything of ours or of an
    outer make, venv or npm."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP)}
    dirs = [d for d in os.environ.get("PATH", "").split(":") if d and not _has_rust(d)]
    env["PATH"] = ":".join([str(f) for f in first] + dirs)
    return env


# ---- the artifacts --------------------------------------------------------------------


class Artifacts:
    def __init__(self):
        self.version = dist_builder.crate_version()
        self.pyversion = dist_builder.pep440(self.version)
        wheels = sorted(DIST.glob("sqlite_writelock-%s-py3-none-*.whl" % self.pyversion))
        self.wheel = wheels[0] if len(wheels) == 1 else None
        self.npm = DIST / ("sqlite-writelock-%s.tgz" % self.version)
        self.tarball = DIST / ("libwritelock-%s-linux-x86_64.tar.gz" % self.version)
        self.so_sha = sha256(RELEASE / "libwritelock.so")
        self.cli_sha = sha256(RELEASE / "writelock")


def artifacts_section(a):
    sec = "dist"
    log(sec, "crate version %s; artifacts in %s:" % (a.version, rel(DIST)))
    for p in sorted(DIST.iterdir()):
        log(sec, "  %-58s %9d bytes" % (p.name, p.stat().st_size))
    if not check(sec, a.wheel is not None, "one wheel sqlite_writelock-%s-py3-none-<platform>.whl" % a.pyversion):
        raise Abort("no wheel")
    check(sec, a.npm.is_file(), a.npm.name)
    check(sec, a.tarball.is_file(), a.tarball.name)
    plat = a.wheel.name.rsplit("-", 1)[1][: -len(".whl")]
    log(sec, "wheel platform tag: %s" % plat)
    check(sec, re.fullmatch(r"manylinux_2_\d+_x86_64|linux_x86_64", plat), "wheel platform tag %s" % plat)
    # The library and the CLI that make build built, byte for byte.
    with zipfile.ZipFile(a.wheel) as z:
        names = z.namelist()
        so = hashlib.sha256(z.read("sqlite_writelock/libwritelock.so")).hexdigest()
        cli_name = "sqlite_writelock-%s.data/scripts/writelock" % a.pyversion
        cli = hashlib.sha256(z.read(cli_name)).hexdigest() if cli_name in names else None
        cli_mode = (z.getinfo(cli_name).external_attr >> 16) & 0o777 if cli else 0
        wheel_meta = z.read("sqlite_writelock-%s.dist-info/WHEEL" % a.pyversion).decode()
    check(sec, so == a.so_sha, "the wheel carries target/release/libwritelock.so")
    check(sec, cli == a.cli_sha and cli_mode & 0o111, "the wheel carries target/release/writelock as an executable data script")
    check(sec, not any(n.endswith(".pth") for n in names), "the wheel ships no .pth file", "\n".join(names))
    check(sec, "Tag: py3-none-%s" % plat in wheel_meta, "WHEEL says Tag: py3-none-%s" % plat, wheel_meta)
    with tarfile.open(a.npm) as t:
        so = hashlib.sha256(t.extractfile("package/lib/libwritelock.so").read()).hexdigest()
        manifest = json.load(t.extractfile("package/package.json"))
        members = sorted(t.getnames())
    check(sec, so == a.so_sha, "the npm package carries target/release/libwritelock.so")
    check(sec, manifest.get("version") == a.version and manifest.get("name") == "sqlite-writelock",
          "package.json: sqlite-writelock@%s" % a.version, json.dumps(manifest))
    check(sec, manifest.get("peerDependencies", {}).get("better-sqlite3", "").startswith("^12"),
          "better-sqlite3 12 is a peer dependency", json.dumps(manifest))
    check(sec, {"package/index.js", "package/index.d.ts", "package/README.md"} <= set(members),
          "index.js, index.d.ts and README.md are in the npm package", "\n".join(members))
    top = "libwritelock-%s-linux-x86_64" % a.version
    with tarfile.open(a.tarball) as t:
        files = {m.name: m for m in t.getmembers() if m.isfile()}
        want = {top + "/bin/writelock", top + "/lib/libwritelock.so", top + "/share/doc/sqlite-writelock/README.md"}
        check(sec, set(files) == want, "the tarball holds bin/writelock, lib/libwritelock.so, share/doc/…/README.md under %s/" % top,
              "\n".join(sorted(files)))
        if set(files) == want:
            check(sec, hashlib.sha256(t.extractfile(top + "/lib/libwritelock.so").read()).hexdigest() == a.so_sha
                  and hashlib.sha256(t.extractfile(top + "/bin/writelock").read()).hexdigest() == a.cli_sha,
                  "the tarball carries target/release/libwritelock.so and writelock")


# ---- Python ----------------------------------------------------------------------------

APP_PY = """import sqlite3
con = sqlite3.connect("app.db")
print(con.execute("SELECT writelock_status()").fetchone()[0])
"""

TRY_WRITE = """import sqlite3, sqlite_writelock
sqlite_writelock.install()
con = sqlite3.connect("app.db", timeout=0.2, isolation_level=None)
try:
    con.execute("CREATE TABLE IF NOT EXISTS t(x)")
    con.execute("INSERT INTO t VALUES (1)")
    print("wrote")
except sqlite3.OperationalError as e:
    print("error: %s" % e)
"""

# install() after a connection to a file is open: a warning names the file,
# and status() of that connection says why it is not protected.
EARLY_PY = """import json, sqlite3, warnings
import sqlite_writelock as w
early = sqlite3.connect("early.db")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    w.install()
print(json.dumps({"warnings": [str(x.message) for x in caught if issubclass(x.category, w.WritelockWarning)],
                  "status": w.status(early)}))
"""


def venv_files(venv):
    """Every path in the venv, without __pycache__ (running pip compiles pip)."""
    return {str(p.relative_to(venv)) for p in venv.rglob("*") if "__pycache__" not in p.parts}


def python_section(a, name, base):
    sec = "python-" + name
    venv = WORK / ("venv-" + name)
    app = WORK / ("python-app-" + name)
    app.mkdir(parents=True)
    env = clean_env()
    check(sec, shutil.which("cargo", path=env["PATH"]) is None and shutil.which("rustc", path=env["PATH"]) is None,
          "no cargo or rustc on PATH (%s)" % env["PATH"])
    run(sec, [base, "-m", "venv", venv], REPO, env)
    py = venv / "bin" / "python"
    env = clean_env([venv / "bin"])
    env["VIRTUAL_ENV"] = str(venv)
    p = run(sec, [py, "-c", "import sqlite3, sys; print(sys.version.split()[0], sqlite3.sqlite_version, "
                  "hasattr(sqlite3.Connection, 'enable_load_extension'))"], app, env, quiet=True)
    pyver, sqlite_version, has_ele = p.stdout.split()
    log(sec, "%s: Python %s, SQLite %s, enable_load_extension: %s" % (base, pyver, sqlite_version, has_ele))
    if name == "debian":
        check(sec, has_ele == "True", "Debian's python3 has enable_load_extension")
        expect_how = "enable_load_extension"
    else:
        expect_how = "ctypes"
        if has_ele == "True":
            log(sec, "this python3 has enable_load_extension: forcing the ctypes loader (SQLITE_WRITELOCK_LOADER=ctypes)")
            env["SQLITE_WRITELOCK_LOADER"] = "ctypes"
    before = venv_files(venv)

    # The README's install line, verbatim; pip sees dist/ and nothing else.
    pip_env = dict(env, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(DIST), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    log(sec, "PIP_NO_INDEX=1 PIP_FIND_LINKS=%s: pip installs from dist/ only, no network" % rel(DIST))
    t = time.monotonic()
    p = run(sec, ["sh", "-e", snippet("python-dist.sh")], app, pip_env)
    check(sec, a.wheel.name in p.stdout + p.stderr or "sqlite_writelock-" in p.stdout,
          "pip installed %s (%.1f s)" % (a.wheel.name, time.monotonic() - t), output(p))
    p = run(sec, [py, "-c", "import importlib.metadata as m; print(m.version('sqlite-writelock'))"], app, env, quiet=True)
    check(sec, p.stdout.strip() == a.pyversion, "installed version %s" % p.stdout.strip())

    # The README's Python snippet.
    p = run(sec, [py, snippet("python-dist.py")], app, env)
    docs = json_objects(p.stdout)
    if check(sec, docs, "python-dist.py printed the status JSON", output(p)):
        check_protected(sec, "python-dist.py", docs[-1], app / "app.db")
    p = run(sec, [py, "-c", EARLY_PY], app, env)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    warned, st = out["warnings"], out["status"]
    check(sec, len(warned) == 1 and str((app / "early.db").resolve()) in warned[0] and "NOT protected" in warned[0],
          "install() with early.db already open: one WritelockWarning naming it", json.dumps(out))
    check(sec, st.get("protected") is False and st.get("loaded") is False and "not protected" in st.get("reason", "")
          and [d.get("protected") for d in st.get("databases", [])] == [False],
          "status() of that connection: not protected, the extension is not loaded into it", json.dumps(out))
    p = run(sec, [py, "-c", "import sqlite_writelock as w; print(w.install()); print(w.path())"], app, env, quiet=True)
    how, so = p.stdout.split()
    check(sec, how == expect_how, "install() loaded it through %s" % how, output(p))
    check(sec, Path(so).is_relative_to(venv) and sha256(so) == a.so_sha, "path() is the library inside the venv: %s" % rel(so))
    # A question through a read-only connection, which takes no lock: it
    # sees the VFS and the lock file, and says it is not protected.
    p = run(sec, [py, "-m", "sqlite_writelock", "status", "app.db"], app, env)
    st = json.loads(p.stdout)
    d = main_db(st)
    check(sec, st.get("vfs") == "writelock" and Path(d.get("file") or "/nonexistent") == (app / "app.db").resolve()
          and d.get("lock_file") == str((app / "app.db.lock").resolve()) and d.get("protected") is False,
          "python -m sqlite_writelock status app.db: VFS writelock, app.db.lock, read-only so not protected", p.stdout)

    # The CLI, from the venv's bin/ through PATH.
    where = shutil.which("writelock", path=env["PATH"])
    check(sec, where == str(venv / "bin" / "writelock"), "writelock on PATH is the venv's: %s" % where)
    p = run(sec, ["writelock", "--version"], app, env)
    check(sec, p.stdout.split()[-1:] == [a.version], "writelock --version: %s" % p.stdout.strip())
    p = run(sec, ["writelock", "status", "app.db", "--json"], app, env)
    st = json.loads(p.stdout)
    check(sec, st.get("db") == "app.db" and st.get("lock_file") == str((app / "app.db.lock").resolve()) and st.get("held") is False,
          "writelock status app.db --json: free", p.stdout)

    # The two together: while `writelock run` holds app.db.lock, a protected
    # connection's write gets "database is locked"; afterwards it writes.
    holder = subprocess.Popen(["writelock", "run", "app.db", "--", "sh", "-c", "read _"], cwd=app, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        held = {}
        while time.monotonic() < deadline:
            held = json.loads(run(sec, ["writelock", "status", "app.db", "--json"], app, env, quiet=True).stdout)
            if held.get("held"):
                break
            time.sleep(0.05)
        check(sec, held.get("held") and held.get("holder_pid"), "writelock run app.db -- …: status says held by pid %s" % held.get("holder_pid"), held)
        p = run(sec, [py, "-c", TRY_WRITE], app, env, quiet=True)
        check(sec, "database is locked" in p.stdout, "a protected write while it holds the lock: %s" % p.stdout.strip(), output(p))
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    p = run(sec, [py, "-c", TRY_WRITE], app, env, quiet=True)
    check(sec, p.stdout.strip() == "wrote", "and after it let go: %s" % p.stdout.strip(), output(p))

    site = Path(run(sec, [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], app, env, quiet=True).stdout.strip())
    if name == "debian":
        auto_pth_checks(sec, py, site, app, env)
    else:
        auto_sitecustomize_checks(sec, py, site, app, env)

    # Uninstall: nothing of the package left, and the interpreter starts.
    run(sec, [py, "-m", "pip", "uninstall", "-y", "sqlite-writelock"], app, env)
    p = run(sec, [py, "-c", "print('started')"], app, env, ok=False, quiet=True)
    check(sec, p.returncode == 0 and p.stdout.strip() == "started" and not p.stderr,
          "after pip uninstall the interpreter starts cleanly", output(p))
    p = run(sec, [py, "-c", "import sqlite_writelock"], app, env, ok=False, quiet=True)
    check(sec, p.returncode != 0 and "No module named 'sqlite_writelock'" in p.stderr, "sqlite_writelock is gone", output(p))
    after = venv_files(venv)
    check(sec, after == before, "the venv holds exactly the files it had before pip install (bin/writelock, the package, its dist-info and any .pth gone)",
          "left: %s\nmissing: %s" % (sorted(after - before), sorted(before - after)))
    check(sec, not list(site.glob("*.pth")) or all(str(p.relative_to(venv)) in before for p in site.glob("*.pth")),
          "no .pth file left in %s" % rel(site), [str(p) for p in site.glob("*.pth")])


def auto_pth_checks(sec, py, site, app, env):
    """The .pth recipe with the wheel's package, and the way out when it fails."""
    (app / "app.py").write_text(APP_PY)
    p = run(sec, ["sh", "-e", snippet("python-pth.sh")], app, env)
    docs = json_objects(p.stdout)
    if check(sec, docs, "the README's .pth recipe (python-pth.sh) protects app.py", output(p)):
        check_protected(sec, "python-pth.sh", docs[-1], app / "app.db")
    pth = site / "sqlite_writelock_auto.pth"
    broken = dict(env, WRITELOCK_PATH=str(app / "missing.so"))
    p = run(sec, [py, "-c", "print('ran')"], app, broken, ok=False, quiet=True)
    msg = p.stderr
    check(sec, p.returncode != 0 and "ran" not in p.stdout, "with the extension unloadable, the .pth stops the interpreter", output(p))
    for want, what in [
        ("refusing to run unprotected", "says why"),
        (str(pth), "names the .pth file"),
        (str(site / "sqlite_writelock" / "auto.py"), "names the auto module"),
        ("site-packages %s" % site, "names the site-packages directory"),
        ("%s -S" % py, "says: python -S"),
        ("rm '%s'" % pth, "says how to delete the .pth"),
        ("pip uninstall sqlite-writelock", "says what pip uninstall does"),
    ]:
        check(sec, want in msg, "the message %s" % what, msg)
    p = run(sec, [py, "-S", "-c", "print('ran')"], app, broken, ok=False, quiet=True)
    check(sec, p.returncode == 0 and p.stdout.strip() == "ran", "python -S starts despite it", output(p))

    # A .pth that a distribution shipped: the message names the distribution
    # and says to delete the file first (pip cannot start either); then pip
    # uninstall removes the rest.
    dist_info = site / "fake_writelock_auto-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-writelock-auto\nVersion: 1.0\n")
    (dist_info / "INSTALLER").write_text("pip\n")
    (dist_info / "RECORD").write_text(
        "sqlite_writelock_auto.pth,,\n%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n" % ((dist_info.name,) * 3))
    p = run(sec, [py, "-m", "pip", "--version"], app, broken, ok=False, quiet=True)
    check(sec, p.returncode != 0 and "refusing to run unprotected" in p.stderr, "pip is stopped by the .pth too", output(p))
    p = run(sec, [py, "-c", "print('ran')"], app, broken, ok=False, quiet=True)
    check(sec, p.returncode != 0 and "installed distribution 'fake-writelock-auto'" in p.stderr
          and "delete it first, then pip uninstall fake-writelock-auto" in p.stderr and "rm '%s'" % pth in p.stderr,
          "for a .pth a distribution shipped, the message names it: rm the file, then pip uninstall", output(p))
    log(sec, "following it: rm %s; pip uninstall -y fake-writelock-auto" % rel(pth))
    pth.unlink()
    run(sec, [py, "-m", "pip", "uninstall", "-y", "fake-writelock-auto"], app, broken)
    check(sec, not dist_info.exists(), "pip uninstall then works and removes the distribution")
    p = run(sec, [py, "-c", "print('ran')"], app, broken, ok=False, quiet=True)
    check(sec, p.returncode == 0 and p.stdout.strip() == "ran", "and the interpreter starts again", output(p))
    pth.unlink(missing_ok=True)
    shutil.rmtree(dist_info, ignore_errors=True)


def auto_sitecustomize_checks(sec, py, site, app, env):
    (app / "app.py").write_text(APP_PY)
    p = run(sec, ["sh", "-e", snippet("python-sitecustomize.sh")], app, env)
    docs = json_objects(p.stdout)
    if check(sec, docs, "the README's sitecustomize recipe protects app.py", output(p)):
        check_protected(sec, "python-sitecustomize.sh", docs[-1], app / "app.db")
    sc = app / "writelock-site" / "sitecustomize.py"
    broken = dict(env, WRITELOCK_PATH=str(app / "missing.so"), PYTHONPATH=str(sc.parent))
    p = run(sec, [py, "-c", "print('ran')"], app, broken, ok=False, quiet=True)
    check(sec, p.returncode != 0 and "ran" not in p.stdout and str(sc) in p.stderr and "%s -S" % py in p.stderr
          and "site-packages %s" % site in p.stderr,
          "unloadable: sitecustomize stops the interpreter; the message names %s, python -S and site-packages" % rel(sc), output(p))


# ---- Node --------------------------------------------------------------------------------


class Registry:
    """An npm registry on 127.0.0.1 that serves one package from a tarball and
    passes every other request through to ``upstream``."""

    def __init__(self, tgz, upstream):
        data = tgz.read_bytes()
        with tarfile.open(tgz) as t:
            manifest = json.load(t.extractfile("package/package.json"))
        self.name, version = manifest["name"], manifest["version"]
        self.upstream = upstream.rstrip("/")
        self.requests = {"local": 0, "upstream": 0}
        reg = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/" + reg.name:
                    reg.requests["local"] += 1
                    return self.send(200, json.dumps(reg.packument).encode(), "application/json")
                if self.path == reg.tarball_path:
                    reg.requests["local"] += 1
                    return self.send(200, data, "application/octet-stream")
                reg.requests["upstream"] += 1
                headers = {"Accept-Encoding": "identity"}
                for h in ("Accept", "User-Agent", "npm-command"):
                    if self.headers.get(h):
                        headers[h] = self.headers[h]
                req = urllib.request.Request(reg.upstream + self.path, headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=120) as r:
                        return self.send(r.status, r.read(), r.headers.get("Content-Type", "application/octet-stream"))
                except urllib.error.HTTPError as e:
                    return self.send(e.code, e.read(), e.headers.get("Content-Type", "text/plain"))
                except Exception as e:  # noqa: BLE001 - tell npm, go on serving
                    return self.send(502, str(e).encode(), "text/plain")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/" % self.server.server_address[1]
        self.tarball_path = "/%s/-/%s" % (self.name, tgz.name)
        self.packument = {
            "name": self.name,
            "dist-tags": {"latest": version},
            "versions": {version: dict(manifest, _id="%s@%s" % (self.name, version), dist={
                "tarball": self.url.rstrip("/") + self.tarball_path,
                "shasum": hashlib.sha1(data).hexdigest(),
                "integrity": "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode(),
            })},
        }
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


NODE_CHECKS = r"""
"use strict";
const Database = require("better-sqlite3");
const w = require("sqlite-writelock");
const out = { warnings: [] };
process.on("warning", (x) => out.warnings.push({ name: x.name, code: x.code, message: x.message }));
const status = (db) => JSON.parse(db.prepare("SELECT writelock_status() AS s").get().s).databases[0];
out.path = w.getLoadablePath();
out.entryPoint = w.ENTRY_POINT;
// Counts the loadExtension() calls load() makes through db.
const counted = (db) => {
  const real = db.loadExtension.bind(db);
  db.loadCalls = 0;
  db.loadExtension = (...a) => { db.loadCalls++; return real(...a); };
  return db;
};
const early = counted(new Database("early.db"));   // opened before loading
// The warning does not wait for the load: with no library to load, load()
// throws, and has warned already.
process.env.WRITELOCK_PATH = require("path").join(__dirname, "no-such-library.so");
let emitted = 0;
const emit = process.emitWarning;
process.emitWarning = (...a) => { emitted++; return emit.apply(process, a); };
try { w.load(early); out.failedLoad = "no error"; } catch (e) { out.failedLoad = e.message; }
out.emittedByFailedLoad = emitted;
delete process.env.WRITELOCK_PATH;
w.load(early);                                    // loads; warned already
w.load(early);                                    // loaded and warned: nothing
out.earlyLoadCalls = early.loadCalls;
out.earlyProtected = status(early).protected;
out.warningsAfterEarly = "pending";
setImmediate(() => {
  out.warningsAfterEarly = out.warnings.length;
  w.load(new Database(":memory:"));               // no file: no warning
  const later = counted(new Database("later.db"));
  out.laterProtected = status(later).protected;
  w.load(later);                                  // already protected: no warning, no load
  out.laterLoadCalls = later.loadCalls;
  out.install = w.install();
  out.installAgain = w.install();
  setImmediate(() => console.log(JSON.stringify(out)));
});
"""

NODE_INSTALL = r"""
const w = require("sqlite-writelock");
const Database = require("better-sqlite3");
const p = w.install();
const db = new Database("installed.db");
console.log(JSON.stringify({ install: p, status: JSON.parse(db.prepare("SELECT writelock_status() AS s").get().s) }));
"""

NODE_ESM = r"""
import { install, getLoadablePath, load, ENTRY_POINT } from "sqlite-writelock";
import Database from "better-sqlite3";
install(Database);
const db = new Database("esm.db");
console.log(JSON.stringify({ path: getLoadablePath(), load: typeof load, entry: ENTRY_POINT,
  status: JSON.parse(db.prepare("SELECT writelock_status() AS s").get().s) }));
"""

NODE_TS = r"""
import { getLoadablePath, load, install, ENTRY_POINT, LoadableDatabase, DatabaseConstructor } from "sqlite-writelock";
declare const db: LoadableDatabase;
declare const Database: DatabaseConstructor;
const p: string = getLoadablePath();
load(db);
const q: string = install();
const r: string = install(Database);
const e: string = ENTRY_POINT;
// @ts-expect-error load() needs a Database, not a file name
load("app.db");
// @ts-expect-error load() returns nothing
const s: string = load(db);
export { p, q, r, e, s };
"""


def npm_upstream(env):
    p = subprocess.run(["npm", "config", "get", "registry"], env=env, capture_output=True, text=True)
    url = p.stdout.strip()
    return url if url.startswith("http") else "https://registry.npmjs.org/"


def node_install(a, state):
    """The slow part, started first: npm install (better-sqlite3 may compile)."""
    sec = "node"
    proj = WORK / "node-app"
    proj.mkdir(parents=True)
    (proj / "package.json").write_text(json.dumps({"name": "dist-test-app", "version": "0.0.0", "private": True}, indent=2) + "\n")
    env = clean_env()
    check(sec, shutil.which("cargo", path=env["PATH"]) is None, "no cargo or rustc on PATH")
    upstream = npm_upstream(env)
    registry = Registry(a.npm, upstream)
    try:
        env.update(npm_config_registry=registry.url, npm_config_audit="false", npm_config_fund="false",
                   npm_config_update_notifier="false")
        log(sec, "local registry %s: sqlite-writelock from %s, everything else from %s" % (registry.url, rel(a.npm), upstream))
        t = time.monotonic()
        p = run(sec, ["sh", "-e", snippet("node-dist.sh")], proj, env)
        log(sec, "npm install took %.1f s (%d requests served locally, %d passed through)"
            % (time.monotonic() - t, registry.requests["local"], registry.requests["upstream"]))
        lock = json.loads((proj / "node_modules" / ".package-lock.json").read_text())
        got = lock["packages"].get("node_modules/sqlite-writelock", {}).get("integrity")
        want = "sha512-" + base64.b64encode(hashlib.sha512(a.npm.read_bytes()).digest()).decode()
        deps = json.loads((proj / "package.json").read_text()).get("dependencies", {})
        check(sec, registry.requests["local"] >= 1 and got == want and deps.get("sqlite-writelock") == "^" + a.version,
              "npm resolved sqlite-writelock@^%s through the registry; its integrity is dist/%s's" % (a.version, a.npm.name),
              "local requests %d, integrity %s (want %s), dependencies %s" % (registry.requests["local"], got, want, deps))
        p = run(sec, ["npm", "install", "--no-save", "typescript@5"], proj, env)
    finally:
        registry.close()
    state["proj"], state["env"] = proj, env


def node_checks(a, state):
    sec = "node"
    proj, env = state["proj"], state["env"]
    pkg = proj / "node_modules" / "sqlite-writelock"
    installed = json.loads((pkg / "package.json").read_text())
    check(sec, installed["version"] == a.version, "node_modules/sqlite-writelock is %s" % installed["version"])
    check(sec, sha256(pkg / "lib" / "libwritelock.so") == a.so_sha, "it carries target/release/libwritelock.so")
    bs = json.loads((proj / "node_modules" / "better-sqlite3" / "package.json").read_text())["version"]
    check(sec, bs.startswith("12."), "better-sqlite3 %s" % bs)

    # The README's snippet, as a file of the project.
    shutil.copy(snippet("node-dist.js"), proj / "node-dist.js")
    p = run(sec, ["node", "node-dist.js"], proj, env)
    docs = json_objects(p.stdout)
    if check(sec, docs, "node-dist.js printed the status JSON", output(p)):
        check_protected(sec, "node-dist.js", docs[-1], proj / "app.db")
    check(sec, "WritelockWarning" not in p.stderr, "node-dist.js (load through ':memory:') warns about nothing", output(p))

    (proj / "checks.js").write_text(NODE_CHECKS)
    p = run(sec, ["node", "checks.js"], proj, env)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    check(sec, Path(out["path"]) == (pkg / "lib" / "libwritelock.so").resolve(), "getLoadablePath() is the package's library: %s" % rel(out["path"]))
    check(sec, out["entryPoint"] == "sqlite3_writelock_init", "ENTRY_POINT")
    check(sec, out["earlyProtected"] is False and out["warningsAfterEarly"] == 1
          and out["warnings"][0]["name"] == "WritelockWarning" and "early.db" in out["warnings"][0]["message"],
          "load(db) on a Database with early.db open: early.db not protected, one WritelockWarning naming it", json.dumps(out))
    check(sec, "WRITELOCK_PATH" in out["failedLoad"] and out["emittedByFailedLoad"] == 1 and out["warningsAfterEarly"] == 1,
          "the warning comes before loading: load() that failed (no library) had warned already", json.dumps(out))
    check(sec, out["earlyLoadCalls"] == 1 and out["laterLoadCalls"] == 0,
          "load() is idempotent: three load(early) (one failed) loaded once and warned once; load(later) loaded nothing",
          json.dumps(out))
    check(sec, "WritelockWarning" in p.stderr and "early.db" in p.stderr and "NOT protected" in p.stderr,
          "the warning is printed: %s" % next((l for l in p.stderr.splitlines() if "WritelockWarning" in l), "")[:160], output(p))
    check(sec, out["laterProtected"] is True and len(out["warnings"]) == 1,
          "a Database opened afterwards is protected; load() through ':memory:' or a protected Database warns about nothing", json.dumps(out))
    check(sec, out["install"] == out["path"] and out["installAgain"] == out["path"], "install() returns the library's path, twice")

    (proj / "install.js").write_text(NODE_INSTALL)
    p = run(sec, ["node", "install.js"], proj, env)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    check_protected(sec, "install() in a fresh process, then new Database()", out["status"], proj / "installed.db")

    (proj / "esm.mjs").write_text(NODE_ESM)
    p = run(sec, ["node", "esm.mjs"], proj, env)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    check(sec, out["load"] == "function" and out["entry"] == "sqlite3_writelock_init", "ES module: named imports")
    check_protected(sec, "ES module install(Database)", out["status"], proj / "esm.db")

    (proj / "check.ts").write_text(NODE_TS)
    p = run(sec, ["node", "node_modules/typescript/bin/tsc", "--noEmit", "--strict", "--module", "commonjs", "check.ts"], proj, env, ok=False)
    check(sec, p.returncode == 0, "index.d.ts type-checks (tsc --strict, with the expected errors flagged)", output(p))


# ---- the tarball ---------------------------------------------------------------------------


def shell_section(a):
    sec = "shell"
    home = WORK / "home"
    app = WORK / "shell-app"
    home.mkdir(parents=True)
    app.mkdir(parents=True)
    shutil.copy(a.tarball, app / a.tarball.name)
    env = clean_env([home / ".local" / "bin"])
    env["HOME"] = str(home)
    check(sec, shutil.which("cargo", path=env["PATH"]) is None, "no cargo or rustc on PATH")
    log(sec, "HOME=%s" % rel(home))
    p = run(sec, ["sh", "-e", snippet("shell-dist.sh")], app, env)
    docs = json_objects(p.stdout)
    status = next((d for d in docs if "databases" in d), None)
    cli = next((d for d in docs if "lock_file" in d), None)
    if check(sec, status, "the README's lines (shell-dist.sh): sqlite3 -cmd '.load ~/.local/lib/libwritelock' printed the status", output(p)):
        check_protected(sec, "sqlite3 shell", status, app / "app.db")
    check(sec, cli and cli.get("db") == "app.db" and cli.get("held") is False and cli.get("exists") is True,
          "writelock status app.db --json from ~/.local/bin", output(p))
    local = home / ".local"
    check(sec, sha256(local / "lib" / "libwritelock.so") == a.so_sha and os.access(local / "bin" / "writelock", os.X_OK),
          "~/.local/lib/libwritelock.so and ~/.local/bin/writelock extracted")
    doc = local / "share" / "doc" / "sqlite-writelock" / "README.md"
    check(sec, doc.is_file() and a.version in doc.read_text(), "~/.local/share/doc/sqlite-writelock/README.md names version %s" % a.version)
    p = run(sec, ["sqlite3", "-cmd", ".load %s/libwritelock" % (local / "lib"), "-cmd", ".open app.db", ":memory:",
                  "SELECT writelock_version();"], app, env)
    check(sec, p.stdout.strip() == a.version, "sqlite3 -cmd '.load <dir>/libwritelock' … SELECT writelock_version(): %s" % p.stdout.strip())
    p = run(sec, ["writelock", "run", "app.db", "--", "writelock", "status", "app.db", "--json"], app, env)
    st = json.loads(p.stdout)
    check(sec, st.get("held") is True, "writelock run app.db -- writelock status: held inside", p.stdout)


# ---- Rust ------------------------------------------------------------------------------------


# The crates a Rust user gets from crates.io, in dependency order.
CRATES = ["writelock-core", "sqlite-writelock", "writelock-cli"]


def rust_section(a, state):
    """crates.io, emulated: the packaged crates (writelock-core, the library
    sqlite-writelock, the command writelock-cli) and the workspace's vendored
    dependencies as a directory source that replaces crates-io."""
    sec = "rust"
    cargo = os.environ.get("CARGO", "cargo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CARGO_TARGET_DIR"))}
    source = WORK / "crates-io"
    run(sec, [cargo, "vendor", "--offline", "--versioned-dirs", "--quiet", source], REPO, env)
    home = WORK / "cargo-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[source.crates-io]\nreplace-with = "dist-test"\n\n[source.dist-test]\ndirectory = "%s"\n\n[net]\noffline = true\n' % source)
    env.update(CARGO_HOME=str(home))
    log(sec, "CARGO_HOME=%s: crates-io is %s (the packaged crates and vendored dependencies), offline" % (rel(home), rel(source)))
    # Each crate is packaged as a publish would: its path dependencies become
    # crates.io ones, resolved here against those packaged before it.
    pkg_target = WORK / "cargo-package"
    for name in CRATES:
        run(sec, [cargo, "package", "--offline", "--no-verify", "--allow-dirty", "-p", name,
                  "--target-dir", pkg_target], REPO, env, quiet=True)
        crate = pkg_target / "package" / ("%s-%s.crate" % (name, a.version))
        if not check(sec, crate.is_file(), "cargo package -p %s: %s (%d bytes)"
                     % (name, crate.name, crate.stat().st_size if crate.is_file() else 0)):
            raise Abort("no %s" % crate)
        with tarfile.open(crate) as t:
            try:
                t.extractall(source, filter="data")
            except TypeError:  # Python < 3.11.4: no extraction filters (our own archive)
                t.extractall(source)
        unpacked = source / ("%s-%s" % (name, a.version))
        files = {str(p.relative_to(unpacked)): sha256(p) for p in unpacked.rglob("*") if p.is_file()}
        (unpacked / ".cargo-checksum.json").write_text(json.dumps({"files": files, "package": sha256(crate)}))
    env.update(CARGO_TARGET_DIR=str(WORK / "cargo-target"))
    proj = WORK / "rust-app"
    (proj / "src").mkdir(parents=True)
    (proj / "Cargo.toml").write_text(
        '[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\npublish = false\n\n'
        "# Its own workspace, not a member of the repository's.\n[workspace]\n\n[dependencies]\n")
    shutil.copy(snippet("rust-dist.rs"), proj / "src" / "main.rs")
    t = time.monotonic()
    run(sec, ["sh", "-e", snippet("rust-dist.sh")], proj, env)
    log(sec, "rust-dist.sh (cargo add, cargo add, cargo install writelock-cli): %.1f s" % (time.monotonic() - t))
    manifest = (proj / "Cargo.toml").read_text()
    check(sec, re.search(r'sqlite-writelock = \{ version = "%s", default-features = false \}' % re.escape(a.version), manifest),
          "cargo add sqlite-writelock --no-default-features", manifest)
    exe = home / "bin" / "writelock"
    p = run(sec, [exe, "--version"], proj, env)
    check(sec, p.stdout.split()[-1:] == [a.version], "cargo install writelock-cli: %s, %s" % (rel(exe), p.stdout.strip()))
    t = time.monotonic()
    run(sec, [cargo, "build", "--release", "--quiet"], proj, env)
    log(sec, "cargo build of the register() program (bundled SQLite): %.1f s" % (time.monotonic() - t))
    app = WORK / "rust-run"
    app.mkdir()
    p = run(sec, [WORK / "cargo-target" / "release" / "app"], app, env)
    docs = json_objects(p.stdout)
    if check(sec, docs, "rust-dist.rs (writelock::register()) printed the status JSON", output(p)):
        check_protected(sec, "rust-dist.rs", docs[-1], app / "app.db")
    p = run(sec, [exe, "status", "app.db", "--json"], app, env)
    check(sec, json.loads(p.stdout).get("exists") is True, "the installed writelock reads app.db.lock", p.stdout)


# ---- docs -----------------------------------------------------------------------------------

DIST_SNIPPETS = ["shell-dist.sh", "python-dist.sh", "python-dist.py", "node-dist.sh", "node-dist.js",
                 "rust-dist.sh", "rust-dist.rs"]


def docs_section(a):
    """docs/install.md quotes every snippet that the sections above run,
    whole; the README's Install section is lines of those snippets, one
    install line and one load line per client, right after the opening
    `make demo` / `make test` block; the package READMEs quote theirs."""
    sec = "docs"
    install = (REPO / "docs" / "install.md").read_text()
    for name in DIST_SNIPPETS:
        body = snippet(name).read_text().rstrip("\n")
        check(sec, fenced_block_is(install, body), "docs/install.md quotes bindings/snippets/%s verbatim, as one block" % name)
    for readme, names in [
        (REPO / "bindings/python/README.md", ["python-dist.sh", "python-dist.py"]),
        (REPO / "bindings/npm/README.md", ["node-dist.sh", "node-dist.js"]),
        (REPO / "bindings/tarball/README.md", ["shell-dist.sh"]),
    ]:
        text = readme.read_text()
        for name in names:
            check(sec, snippet(name).read_text().rstrip("\n") in text, "%s quotes %s verbatim" % (rel(readme), name))
    blocks = "\n".join(code_blocks(install))
    bad = [w for w in ("target/", "./bindings", "bindings/", "--path") if w in blocks]
    check(sec, not bad, "no path into a checkout in docs/install.md's code blocks", bad)
    check(sec, not (REPO / "dist-README-section.md").exists(), "no dist-README-section.md beside docs/install.md")

    readme = (REPO / "README.md").read_text()
    first = code_blocks(readme)[:1]
    # The block's commands, without the comment lines that continue them.
    commands = [l.split()[:2] for l in first[0].splitlines() if l.strip() and not l.lstrip().startswith("#")] if first else []
    check(sec, commands[:2] == [["make", "demo"], ["make", "test"]],
          "README.md opens with `make demo` and `make test`", first)
    heads = re.findall(r"^## (.+)$", readme, re.M)
    check(sec, heads[:1] == ["Install"], "README.md's first section after them is Install", heads[:3])
    m = re.search(r"^## Install\n(.*?)(?=^## )", readme, re.S | re.M)
    part = m.group(1) if m else ""
    check(sec, "(docs/install.md)" in part, "README.md's Install section points to docs/install.md")
    # Lines as the snippets have them, but for indentation.
    lines = [l.strip() for b in code_blocks(part) for l in b.splitlines() if l.strip()]
    ran = {name: [l.strip() for l in snippet(name).read_text().splitlines()] for name in DIST_SNIPPETS}
    stray = [l for l in lines if not any(l in body for body in ran.values())]
    check(sec, lines and not stray, "README.md's Install lines (%d) are each a line of a snippet that runs here" % len(lines), stray)
    for client, files in [("shell", ["shell-dist.sh"]), ("python", ["python-dist.sh", "python-dist.py"]),
                          ("node", ["node-dist.sh", "node-dist.js"]), ("rust", ["rust-dist.sh", "rust-dist.rs"])]:
        from_files = [l for l in lines if any(l in ran[f] for f in files)]
        check(sec, len(from_files) >= 2, "README.md's Install section has install and load lines for %s" % client, from_files)


def code_blocks(markdown):
    """The bodies of the fenced code blocks, in order."""
    return re.findall(r"^```[a-z]*\n(.*?)^```", markdown, re.S | re.M)


def fenced_block_is(markdown, body):
    return any(b.rstrip("\n") == body for b in code_blocks(markdown))


# ---- main -------------------------------------------------------------------------------------


def guarded(sec, fn, *args):
    try:
        fn(*args)
    except Abort as e:
        check(sec, False, "stopped", str(e))
    except Exception:  # noqa: BLE001 - report, and let the other sections finish
        check(sec, False, "crashed", traceback.format_exc())


def main():
    t0 = time.monotonic()
    only = set(filter(None, os.environ.get("TEST_DIST_ONLY", "python,node,shell,rust,docs").split(",")))
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    a = Artifacts()
    guarded("dist", artifacts_section, a)
    if any(not ok for _, ok, _ in RESULTS):
        return finish(t0)

    # The slow ones (npm may compile better-sqlite3; cargo compiles) in the
    # background, the rest meanwhile.
    node_state = {}
    background = []
    if "node" in only:
        background.append(threading.Thread(target=guarded, args=("node", node_install, a, node_state)))
    if "rust" in only:
        background.append(threading.Thread(target=guarded, args=("rust", rust_section, a, {})))
    for th in background:
        th.start()
    if "docs" in only:
        guarded("docs", docs_section, a)
    if "shell" in only:
        guarded("shell", shell_section, a)
    if "python" in only:
        guarded("python-debian", python_section, a, "debian", "/usr/bin/python3")
        pyenv = subprocess.run(["python3", "-c", "import sys; print(sys.executable)"], env=clean_env(),
                               capture_output=True, text=True).stdout.strip()
        guarded("python-path", python_section, a, "path", pyenv)
    for th in background:
        th.join()
    if "node" in only and "proj" in node_state:
        guarded("node", node_checks, a, node_state)
    return finish(t0)


def finish(t0):
    failed = [(s, w) for s, ok, w in RESULTS if not ok]
    sections = sorted({s for s, _, _ in RESULTS})
    print("\n== test-dist: %d checks, %d failed, %.0f s" % (len(RESULTS), len(failed), time.monotonic() - t0))
    for s in sections:
        n = sum(1 for x, _, _ in RESULTS if x == s)
        f = sum(1 for x, ok, _ in RESULTS if x == s and not ok)
        print("   %-14s %3d checks%s" % (s, n, ", %d FAILED" % f if f else ""))
    for s, w in failed:
        print("   FAILED [%s] %s" % (s, w.splitlines()[0]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
