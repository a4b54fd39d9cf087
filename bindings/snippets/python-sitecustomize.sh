mkdir -p writelock-site
echo 'import sqlite_writelock.auto' > writelock-site/sitecustomize.py
PYTHONPATH="$PWD/writelock-site" python app.py   # any program, unmodified
