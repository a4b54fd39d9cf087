// The Node client of the cross-client tests (tests/clients.rs); the same
// protocol as examples/src/bin/worker.rs.
//
//   node worker.js load|stock DB CMD [N]
//
// load: db.loadExtension($WRITELOCK_PATH) into a :memory: Database first.
// CMD: status | hold | try | write N. Rows go to t(client, i, ts); client is
// $WORKER_TAG (default "node").
"use strict";
const fs = require("fs");
const Database = require("better-sqlite3");

const INSERT =
  "INSERT INTO t(client, i, ts) VALUES (?, ?, (julianday('now') - 2440587.5) * 86400000.0)";

function readLine() {
  const buf = Buffer.alloc(1);
  for (;;) {
    let n;
    try {
      n = fs.readSync(0, buf, 0, 1, null);
    } catch (e) {
      if (e.code === "EAGAIN") continue;
      throw e;
    }
    if (n === 0 || buf[0] === 10) return;
  }
}

const [mode, file, cmd, n] = process.argv.slice(2);
if (mode === "load") {
  const loader = new Database(":memory:");
  loader.loadExtension(process.env.WRITELOCK_PATH);
  loader.close();
} else if (mode !== "stock") {
  throw new Error("usage: worker.js load|stock DB CMD [N]");
}
const tag = process.env.WORKER_TAG || "node";
const db = new Database(file, { timeout: 20000 });
console.log("sqlite_version=" + db.prepare("SELECT sqlite_version() AS v").get().v);
let status;
try {
  status = db.prepare("SELECT writelock_status() AS s").get().s;
} catch (e) {
  status = "missing: " + e.message;
}
console.log("status=" + status);
const insert = db.prepare(INSERT);
if (cmd === "status") {
  // nothing more
} else if (cmd === "hold") {
  db.pragma("busy_timeout = 5000");
  db.exec("BEGIN IMMEDIATE");
  insert.run(tag, 0);
  console.log("holding");
  readLine();
  db.exec("COMMIT");
  console.log("committed");
} else if (cmd === "try") {
  db.pragma("busy_timeout = 200");
  try {
    insert.run(tag, 0);
    console.log("ok");
  } catch (e) {
    console.log("error=" + e.message);
  }
} else if (cmd === "write") {
  db.pragma("busy_timeout = 20000");
  const count = Number(n);
  for (let i = 0; i < count; i++) {
    db.exec("BEGIN IMMEDIATE");
    insert.run(tag, i);
    db.exec("COMMIT");
    if (i === 0) console.log("writing");
  }
  console.log("done=" + count);
} else {
  throw new Error("unknown command " + cmd);
}
db.close();
