//! The shared library must never be unloaded once loaded: SQLite keeps
//! pointers to its VFS and auto-extension, and its fork handler stays
//! registered. SQLite unloads a library whose entry point fails (say, out of
//! memory after the VFS was registered), so mark it `nodelete` for the
//! dynamic loader, whatever the entry point returns.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
