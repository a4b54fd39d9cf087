cargo add sqlite-writelock --no-default-features   # for a program that links SQLite itself: writelock::register()
cargo add rusqlite@0.37 --features bundled         # its libsqlite3-sys (0.35) is the one sqlite-writelock pins
cargo install writelock-cli                        # the writelock command, into ~/.cargo/bin
