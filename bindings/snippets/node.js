const Database = require("better-sqlite3"); // npm install better-sqlite3@12

const loader = new Database(":memory:"); // once per process, before opening
loader.loadExtension("./target/release/libwritelock.so");
loader.close();

const db = new Database("app.db"); // protected
console.log(db.prepare("SELECT writelock_status() AS s").get().s);
