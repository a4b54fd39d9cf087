const Database = require("better-sqlite3");
const writelock = require("sqlite-writelock");

writelock.load(new Database(":memory:")); // once per process, before opening databases
const db = new Database("app.db"); // protected
console.log(db.prepare("SELECT writelock_status() AS s").get().s);
