npm install sqlite-writelock better-sqlite3@12
