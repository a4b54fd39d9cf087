"""Build: cargo builds the extension from this repository's Rust crate, and the
shared library ships inside the `sqlite_writelock` package.

`pip install ./bindings/python` (from the repository root) runs
`cargo rustc --lib --release --crate-type cdylib` through setuptools-rust, with
`CARGO_TARGET_DIR` defaulting to `<repo>/target/python` so it never touches the
`target/release/libwritelock.so` that `make` builds (set CARGO_TARGET_DIR to
override). The wheel is tagged py3-none-<platform>: the library does not
depend on the Python version.
"""

import os
import re
from pathlib import Path

from setuptools import setup
from setuptools_rust import Binding, RustExtension

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CARGO_TOML = REPO / "Cargo.toml"

if not CARGO_TOML.is_file():
    raise SystemExit(
        f"sqlite-writelock: {CARGO_TOML} not found; build this package from a "
        "checkout of the sqlite-writelock repository (pip install ./bindings/python)"
    )


def crate_version() -> str:
    text = CARGO_TOML.read_text(encoding="utf-8")
    package = text.split("[package]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', package, re.M).group(1)


env = dict(os.environ)
env.setdefault("CARGO_TARGET_DIR", str(REPO / "target" / "python"))

# setuptools' own scratch (build/, *.egg-info) goes under target/ too, so an
# in-tree `pip install ./bindings/python` leaves the source tree clean.
SCRATCH = REPO / "target" / "python" / "setuptools"
SCRATCH.mkdir(parents=True, exist_ok=True)

cmdclass = {}
try:
    try:
        from setuptools.command.bdist_wheel import bdist_wheel
    except ImportError:  # setuptools < 70.1
        from wheel.bdist_wheel import bdist_wheel

    class bdist_wheel_any_python(bdist_wheel):
        def get_tag(self):
            _, _, plat = super().get_tag()
            return "py3", "none", plat

    cmdclass["bdist_wheel"] = bdist_wheel_any_python
except ImportError:
    pass

setup(
    version=crate_version(),
    rust_extensions=[
        RustExtension(
            # Ends up as sqlite_writelock/_writelock<EXT_SUFFIX>; SQLite derives
            # the entry point sqlite3_writelock_init from that name too.
            "sqlite_writelock._writelock",
            path=str(CARGO_TOML),
            binding=Binding.NoBinding,
            env=env,
        )
    ],
    cmdclass=cmdclass,
    options={
        "build": {"build_base": str(SCRATCH / "build")},
        "egg_info": {"egg_base": str(SCRATCH)},
    },
)
