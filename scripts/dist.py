#!/usr/bin/env python3
"""`make dist`: package the library and the CLI that `make build` already built.

    python3 scripts/dist.py [--from target/release] [--out dist]
    python3 scripts/dist.py --version        # print the crate's version and exit

Writes into dist/ (nothing is compiled here: no cargo build, no network):

  sqlite_writelock-<v>-py3-none-<platform>.whl
      the Python package with libwritelock.so inside and the `writelock` binary as
      a wheel data script (pip puts it into the environment's bin/, unchanged).
      <platform> is manylinux_2_<N>_x86_64 for the highest GLIBC_2.<N> symbol
      version that either file needs (read with objdump -T, or readelf), when
      they link nothing beyond what the manylinux policy allows; otherwise
      linux_x86_64.
  sqlite-writelock-<v>.tgz
      the npm package (`npm pack` of bindings/npm with lib/libwritelock.so).
  libwritelock-<v>-linux-x86_64.tar.gz
      bin/writelock, lib/libwritelock.so and share/doc/sqlite-writelock/README.md
      under one top directory, for `tar -xzf … -C ~/.local --strip-components=1`.

`writelock` is the binary of the package writelock-cli, libwritelock.so the
library of sqlite-writelock; both come from target/release as `make build`
left them.

The version is the crate sqlite-writelock's: `cargo metadata --no-deps`, falling
back to reading the Cargo.toml files (root [package], [workspace.package], or a
member's). writelock-cli must have the same version, or nothing is written.
Standard library only; Python >= 3.11 (tomllib) for the wheel's metadata.
"""

import argparse
import base64
import csv
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CRATE = "sqlite-writelock"
LIB = "libwritelock.so"
CLI = "writelock"
CLI_CRATE = "writelock-cli"  # the package whose binary CLI is

# Libraries a manylinux wheel may link without bundling them (PEP 600 / the
# policy auditwheel enforces for glibc-based manylinux_2_x tags).
MANYLINUX_LIBS = {
    "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0",
    "libgcc_s.so.1", "libstdc++.so.6", "ld-linux-x86-64.so.2", "libutil.so.1",
    "libcrypt.so.1", "libnsl.so.1", "libz.so.1",
}
# The newest libgcc_s symbol versions any manylinux_2_x (x >= 17) policy allows.
MANYLINUX_GCC_MAX = (7, 0, 0)

# Every archive entry gets this time, so the same inputs give the same bytes.
EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))  # 1980-01-01


def say(msg):
    print("dist: " + msg, flush=True)


# ---- the version ------------------------------------------------------------------


def _toml(path):
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


def _version_from_manifests(name):
    """A package's version without cargo: the Cargo.toml whose [package] is
    ``name``, at the root or in a workspace member, with version.workspace =
    true resolved through the root's [workspace.package]."""
    root = _toml(REPO / "Cargo.toml")
    ws_version = root.get("workspace", {}).get("package", {}).get("version")
    manifests = [REPO / "Cargo.toml"]
    for pattern in root.get("workspace", {}).get("members", []):
        manifests += [Path(p) / "Cargo.toml" for p in sorted(glob.glob(str(REPO / pattern)))]
    for m in manifests:
        if not m.is_file():
            continue
        pkg = _toml(m).get("package", {})
        if pkg.get("name") != name:
            continue
        v = pkg.get("version")
        if isinstance(v, dict) and v.get("workspace"):
            v = ws_version
        if isinstance(v, str):
            return v
    raise SystemExit("dist: no version for package %s in %s" % (name, ", ".join(map(str, manifests))))


def crate_version(name=CRATE):
    """The version of package ``name`` (by default the library's, which is
    the version of every artifact)."""
    cargo = os.environ.get("CARGO", "cargo")
    try:
        out = subprocess.run(
            [cargo, "metadata", "--no-deps", "--format-version", "1", "--offline"],
            cwd=REPO, capture_output=True, check=True, text=True,
        ).stdout
        for p in json.loads(out)["packages"]:
            if p["name"] == name:
                return p["version"]
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        pass
    return _version_from_manifests(name)


def pep440(v):
    """Semver (the crate's) to a PEP 440 version for the wheel: 1.2.0-rc.1 -> 1.2.0rc1."""
    m = re.fullmatch(r"(\d+\.\d+\.\d+)(?:-(alpha|beta|rc)\.?(\d+))?(?:\+.*)?", v)
    if not m:
        raise SystemExit("dist: cannot express crate version %r as a Python version" % v)
    base, pre, n = m.groups()
    return base + ({"alpha": "a", "beta": "b", "rc": "rc"}[pre] + n if pre else "")


# ---- which platform the binaries need --------------------------------------------


def _elf_needs(path):
    """(NEEDED libraries, {'GLIBC': {(2, 34), …}, 'GCC': {…}}) of an ELF file,
    from `objdump -p -T` (binutils) or `readelf -d -V`."""
    versions = {}
    for tool in (["objdump", "-p", "-T"], ["readelf", "-d", "-V", "-W"]):
        try:
            out = subprocess.run(tool + [str(path)], capture_output=True, check=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        needed = set(re.findall(r"NEEDED\)?\s+(?:Shared library: \[)?([^\s\]]+)", out))
        for name, ver in re.findall(r"\b(GLIBC|GCC)_(\d+(?:\.\d+)*)\b", out):
            versions.setdefault(name, set()).add(tuple(int(x) for x in ver.split(".")))
        return needed, versions
    return None, None


def platform_tag(files):
    """manylinux_2_N_x86_64 if every file qualifies, with N the highest
    GLIBC_2.N any of them needs; else linux_x86_64. Prints why."""
    import platform

    if platform.machine() != "x86_64" or not sys.platform.startswith("linux"):
        raise SystemExit("dist: only linux x86_64 builds are packaged (this is %s %s)" % (sys.platform, platform.machine()))
    worst = (2, 5)
    for f in files:
        needed, versions = _elf_needs(f)
        if needed is None:
            say("neither objdump nor readelf found: cannot check glibc versions, tagging linux_x86_64")
            return "linux_x86_64"
        extra = needed - MANYLINUX_LIBS
        if extra:
            say("%s links %s, outside the manylinux policy: tagging linux_x86_64" % (f.name, ", ".join(sorted(extra))))
            return "linux_x86_64"
        gcc = max(versions.get("GCC", {(0,)}))
        if gcc > MANYLINUX_GCC_MAX:
            say("%s needs GCC_%s from libgcc_s: tagging linux_x86_64" % (f.name, ".".join(map(str, gcc))))
            return "linux_x86_64"
        glibc = max(versions.get("GLIBC", {(2, 5)}))
        say("%s needs GLIBC_%s (highest symbol version), links %s" % (f.name, ".".join(map(str, glibc)), ", ".join(sorted(needed))))
        worst = max(worst, glibc[:2])
    if worst[0] != 2:
        return "linux_x86_64"
    return "manylinux_2_%d_x86_64" % max(worst[1], 17)


# ---- archives ----------------------------------------------------------------------


def _zipinfo(name, mode):
    zi = zipfile.ZipInfo(name, date_time=_dostime())
    zi.external_attr = (stat.S_IFREG | mode) << 16
    zi.compress_type = zipfile.ZIP_DEFLATED
    return zi


def _dostime():
    import time

    t = time.gmtime(max(EPOCH, 315532800))
    return t[:6]


def _record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(version, release, out):
    pyver = pep440(version)
    so, cli = release / LIB, release / CLI
    tag = "py3-none-" + platform_tag([so, cli])
    project = _toml(REPO / "bindings/python/pyproject.toml")["project"]
    name = project["name"]
    dist = name.replace("-", "_")
    distinfo = "%s-%s.dist-info" % (dist, pyver)
    data = "%s-%s.data" % (dist, pyver)
    readme = (REPO / "bindings/python" / project["readme"]).read_text(encoding="utf-8")

    # Metadata 2.1: every pip that knows manylinux_2_x tags (>= 20.3) reads it.
    meta = [
        "Metadata-Version: 2.1",
        "Name: " + name,
        "Version: " + pyver,
        "Summary: " + project["description"],
        "License: " + project["license"],
        "Requires-Python: " + project["requires-python"],
    ]
    meta += ["Classifier: " + c for c in project.get("classifiers", [])]
    meta += ["Description-Content-Type: text/markdown", "", readme]
    wheel_meta = "\n".join([
        "Wheel-Version: 1.0",
        "Generator: sqlite-writelock scripts/dist.py",
        "Root-Is-Purelib: false",
        "Tag: " + tag,
        "",
    ])

    files = []  # (archive name, bytes, mode)
    pkg = REPO / "bindings/python/src/sqlite_writelock"
    for py in sorted(pkg.glob("*.py")):
        files.append(("sqlite_writelock/" + py.name, py.read_bytes(), 0o644))
    # The name path() looks for; SQLite would derive the entry point
    # sqlite3_writelock_init from it, and install() names it anyway.
    files.append(("sqlite_writelock/" + LIB, so.read_bytes(), 0o755))
    # A wheel data script: pip copies it into the environment's scripts
    # directory (venv/bin, ~/.local/bin), keeps the executable bit, and leaves
    # a non-#!python file as it is: the native binary, no Python in between.
    files.append((data + "/scripts/" + CLI, cli.read_bytes(), 0o755))
    files.append((distinfo + "/METADATA", "\n".join(meta).encode(), 0o644))
    files.append((distinfo + "/WHEEL", wheel_meta.encode(), 0o644))

    record = io.StringIO()
    w = csv.writer(record, lineterminator="\n")
    for arc, body, _ in files:
        w.writerow([arc, _record_hash(body), len(body)])
    w.writerow([distinfo + "/RECORD", "", ""])
    files.append((distinfo + "/RECORD", record.getvalue().encode(), 0o644))

    path = out / ("%s-%s-%s.whl" % (dist, pyver, tag))
    with zipfile.ZipFile(path, "w") as z:
        for arc, body, mode in files:
            z.writestr(_zipinfo(arc, mode), body)
    return path


def build_npm(version, release, out, scratch):
    src = REPO / "bindings/npm"
    stage = scratch / "npm" / "package"
    shutil.rmtree(stage.parent, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in ("index.js", "index.d.ts", "README.md"):
        shutil.copy2(src / f, stage / f)
    (stage / "lib").mkdir()
    shutil.copy2(release / LIB, stage / "lib" / LIB)
    manifest = json.loads((src / "package.json").read_text(encoding="utf-8"))
    manifest["version"] = version
    (stage / "package.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    o = subprocess.run(
        ["npm", "pack", "--json", "--pack-destination", str(out.resolve())],
        cwd=stage, capture_output=True, text=True,
    )
    if o.returncode != 0:
        raise SystemExit("dist: npm pack failed:\n%s%s" % (o.stdout, o.stderr))
    name = json.loads(o.stdout)[0]["filename"]
    return out / name


def build_tarball(version, release, out):
    top = "libwritelock-%s-linux-x86_64" % version
    path = out / (top + ".tar.gz")
    entries = [
        ("bin/" + CLI, release / CLI, 0o755),
        ("lib/" + LIB, release / LIB, 0o755),
        ("share/doc/sqlite-writelock/README.md", REPO / "bindings/tarball/README.md", 0o644),
    ]
    dirs = sorted({top + "/" + "/".join(a.split("/")[:i]) for a, _, _ in entries for i in range(1, a.count("/") + 1)} | {top})
    # gzip header without a time stamp or file name, for reproducible bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            def add(name, mode, body=None):
                ti = tarfile.TarInfo(name)
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = EPOCH, 0, 0, "root", "root"
                ti.mode = mode
                if body is None:
                    ti.type = tarfile.DIRTYPE
                    tar.addfile(ti)
                else:
                    ti.size = len(body)
                    tar.addfile(ti, io.BytesIO(body))

            for d in dirs:
                add(d, 0o755)
            for arc, src, mode in entries:
                body = src.read_bytes()
                if arc.endswith("README.md"):
                    body = body.replace(b"@VERSION@", version.encode())
                add(top + "/" + arc, mode, body)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="release", default=str(REPO / "target/release"),
                    help="where make build put libwritelock.so and writelock")
    ap.add_argument("--out", default=str(REPO / "dist"))
    ap.add_argument("--version", action="store_true", help="print the crate's version and exit")
    args = ap.parse_args()
    version = crate_version()
    if args.version:
        print(version)
        return
    # The wheel and the tarball carry the command under the library's version.
    cli_version = crate_version(CLI_CRATE)
    if cli_version != version:
        raise SystemExit("dist: %s is %s but %s is %s: the artifacts would carry a command of "
                         "another version; give both the same version" % (CLI_CRATE, cli_version, CRATE, version))
    release, out = Path(args.release), Path(args.out)
    for f in (release / LIB, release / CLI):
        if not f.is_file():
            raise SystemExit("dist: %s is missing: run `make build` first" % f)
    out.mkdir(parents=True, exist_ok=True)
    # dist/ holds one set: earlier versions' artifacts of ours go.
    for pattern in ("sqlite_writelock-*.whl", "sqlite-writelock-*.tgz", "libwritelock-*-linux-x86_64.tar.gz"):
        for old in out.glob(pattern):
            old.unlink()
    scratch = REPO / "target" / "dist"
    say("version %s (from %s)" % (version, release))
    made = [
        build_wheel(version, release, out),
        build_npm(version, release, out, scratch),
        build_tarball(version, release, out),
    ]
    for p in made:
        say("wrote %s (%d bytes)" % (p.relative_to(out.parent) if out.parent in p.parents else p, p.stat().st_size))


if __name__ == "__main__":
    main()
