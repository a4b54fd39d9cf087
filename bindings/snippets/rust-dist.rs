use rusqlite::Connection;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    writelock::register()?; // once, before opening connections: VFS `writelock` is now the default
    let db = Connection::open("app.db")?; // protected
    let status: String = db.query_row("SELECT writelock_status()", [], |r| r.get(0))?;
    println!("{status}");
    Ok(())
}
