import json
import sqlite3

import sqlite_writelock

sqlite_writelock.install()  # once per process, before opening connections
con = sqlite3.connect("app.db")  # protected
print(json.dumps(sqlite_writelock.status(con)))
