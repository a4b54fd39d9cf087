// A program that links SQLite itself: call register() once, before opening
// connections. Cargo.toml (see examples/Cargo.toml):
//   sqlite-writelock = { path = "…", default-features = false }
//   rusqlite = { version = "0.37", features = ["bundled"] }
use rusqlite::Connection;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    writelock::register()?; // VFS `writelock` is now the default
    let db = Connection::open("app.db")?;
    let status: String = db.query_row("SELECT writelock_status()", [], |r| r.get(0))?;
    println!("{status}");
    Ok(())
}
