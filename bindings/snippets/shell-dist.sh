mkdir -p ~/.local && tar -xzf libwritelock-*-linux-x86_64.tar.gz -C ~/.local --strip-components=1   # lib/libwritelock.so, bin/writelock
sqlite3 -cmd ".load $HOME/.local/lib/libwritelock" -cmd '.open app.db' :memory: 'SELECT writelock_status();'
writelock status app.db --json   # the command, from ~/.local/bin
