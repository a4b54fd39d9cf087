// Types for sqlite-writelock. Structural, so they need neither better-sqlite3
// nor @types/better-sqlite3: any better-sqlite3 (12) Database fits.

/** The parts of a better-sqlite3 Database that load() and install() use. */
export interface LoadableDatabase {
  readonly name: string;
  loadExtension(path: string, entryPoint?: string): unknown;
  prepare(sql: string): { pluck(toggle?: boolean): { get(...params: unknown[]): unknown } };
  pragma(source: string, options?: { simple?: boolean }): unknown;
  close(): unknown;
}

/** A better-sqlite3 Database class (the module's default export). */
export type DatabaseConstructor = new (filename?: string, options?: object) => LoadableDatabase;

/** The extension's entry point, `sqlite3_writelock_init`. */
export declare const ENTRY_POINT: string;

/**
 * Absolute path of the extension's shared library (`$WRITELOCK_PATH` when
 * set, else the copy inside this package), for `db.loadExtension()`,
 * node:sqlite, the sqlite3 shell, …
 */
export declare function getLoadablePath(): string;

/**
 * Load the extension through `db`. Connections opened afterwards are
 * protected; `db` itself is not if it already has a database file open (a
 * `WritelockWarning` is emitted then, before loading and once per Database).
 * Idempotent: a Database that has the extension already is not loaded into
 * again.
 */
export declare function load(db: LoadableDatabase): void;

/**
 * Make VFS `writelock` the process default of better-sqlite3's SQLite (loads
 * through a fresh ':memory:' Database). Idempotent. Returns the library path.
 */
export declare function install(Database?: DatabaseConstructor): string;
