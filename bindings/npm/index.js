// sqlite-writelock for Node: the extension's shared library, and helpers to
// load it into better-sqlite3.
//
// Loading registers VFS `writelock` as the default VFS of the SQLite library
// that did the loading (better-sqlite3 bundles its own), for the whole
// process: connections opened AFTER loading are protected, the one it was
// loaded through keeps the VFS it was opened with.
"use strict";

const fs = require("fs");
const path = require("path");

/** The extension's entry point (SQLite also derives it from the file name). */
const ENTRY_POINT = "sqlite3_writelock_init";

const LIBRARY = path.join(__dirname, "lib", "libwritelock.so");

let installedPath = null;

/**
 * Absolute path of the extension's shared library: $WRITELOCK_PATH when set,
 * else the copy inside this package. For better-sqlite3's
 * db.loadExtension(), node:sqlite's loadExtension(), the sqlite3 shell, …
 */
function getLoadablePath() {
  const env = process.env.WRITELOCK_PATH;
  if (env) {
    if (!fs.statSync(env, { throwIfNoEntry: false })?.isFile()) {
      throw new Error(`sqlite-writelock: WRITELOCK_PATH=${env} is not a file`);
    }
    return path.resolve(env);
  }
  if (process.platform !== "linux" || process.arch !== "x64") {
    throw new Error(
      `sqlite-writelock: this package carries a linux-x64 library only (this is ${process.platform}-${process.arch}); ` +
        "build the extension from source and set WRITELOCK_PATH"
    );
  }
  if (!fs.existsSync(LIBRARY)) {
    throw new Error(`sqlite-writelock: ${LIBRARY} is missing; reinstall the package`);
  }
  return LIBRARY;
}

function hasFunctions(db) {
  try {
    db.prepare("SELECT writelock_version()").pluck().get();
    return true;
  } catch {
    return false;
  }
}

/** Files (schema, path) of `db` that are open without the writelock VFS. */
function unprotectedFiles(db) {
  let files;
  try {
    files = db.pragma("database_list").filter((r) => r.file);
  } catch {
    return [];
  }
  if (files.length === 0) return [];
  try {
    const doc = JSON.parse(db.prepare("SELECT writelock_status()").pluck().get());
    return doc.databases.filter((d) => d.file && !d.protected).map((d) => [d.schema, d.file]);
  } catch {
    // No SQL functions on this connection: nothing of it is protected.
    return files.map((r) => [r.name, r.file]);
  }
}

// Databases load() has warned about: one warning per Database, however
// often it is passed.
const warned = new WeakSet();

/**
 * Load the extension through `db`, an open better-sqlite3 Database (the
 * `sqliteVec.load(db)` convention). Connections opened from now on are
 * protected; `db` itself is not when it already has a database file open, and
 * a warning (process.emitWarning, type "WritelockWarning") says so. Load
 * through a ':memory:' Database, or call install(), before opening your
 * databases.
 *
 * The warning comes first, whether or not loading then succeeds, and once
 * per Database. Idempotent: a Database that has the extension's functions
 * already (loaded through it, or opened after a load) is not loaded into again.
 */
function load(db) {
  if (!db || typeof db.loadExtension !== "function") {
    throw new TypeError("sqlite-writelock: load(db) needs a better-sqlite3 Database");
  }
  // What db has open without the VFS is decided by how it was opened, not by
  // this load: say so before loading, so a failed load does not hide it.
  if (!warned.has(db)) {
    const unprotected = unprotectedFiles(db);
    if (unprotected.length > 0) {
      warned.add(db);
      const names = unprotected.map(([schema, f]) => `${f} (${schema})`).join(", ");
      process.emitWarning(
        `sqlite-writelock: load(): ${names} of this connection (db.name ${JSON.stringify(db.name)}) ` +
          "was opened before the extension was loaded and is NOT protected; connections opened " +
          "from now on are. Load it (or call install()) before opening your databases.",
        { type: "WritelockWarning", code: "WRITELOCK_NOT_PROTECTED" }
      );
    }
  }
  const file = getLoadablePath();
  // Loaded through db before, or opened after a load elsewhere in this
  // process: the VFS is registered and db has the functions.
  if (!hasFunctions(db)) db.loadExtension(file, ENTRY_POINT);
}

/**
 * Make `writelock` the default VFS of better-sqlite3's SQLite for this
 * process: loads the extension through a fresh ':memory:' Database, then
 * checks that a new connection sees it. Idempotent. Pass your own Database
 * class if this package would resolve a different copy of better-sqlite3.
 * Returns the library's path.
 */
function install(Database) {
  if (installedPath) return installedPath;
  const Db = Database || require("better-sqlite3");
  const file = getLoadablePath();
  const loader = new Db(":memory:");
  try {
    if (!hasFunctions(loader)) loader.loadExtension(file, ENTRY_POINT);
  } finally {
    loader.close();
  }
  const check = new Db(":memory:");
  try {
    const vfs = JSON.parse(check.prepare("SELECT writelock_status()").pluck().get()).vfs;
    if (vfs !== "writelock") throw new Error(`sqlite-writelock: loaded, but the default VFS is ${vfs}`);
  } finally {
    check.close();
  }
  installedPath = file;
  return file;
}

module.exports = { ENTRY_POINT, getLoadablePath, load, install };
