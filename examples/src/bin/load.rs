// A program that loads the built extension (rusqlite "load_extension"): load it
// into any connection once, then open the databases.
use rusqlite::Connection;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let loader = Connection::open_in_memory()?;
    // SAFETY: loading a trusted extension, built from this repository.
    unsafe {
        loader.load_extension_enable()?;
        loader.load_extension("./target/release/libwritelock.so", None::<&str>)?;
    }
    let db = Connection::open("app.db")?;
    let status: String = db.query_row("SELECT writelock_status()", [], |r| r.get(0))?;
    println!("{status}");
    Ok(())
}
