sqlite3 -cmd '.load ./target/release/libwritelock' -cmd '.open app.db'   # then type or pipe SQL
sqlite3 -cmd '.load ./target/release/libwritelock' -cmd '.open app.db' :memory: 'SELECT writelock_status();'
