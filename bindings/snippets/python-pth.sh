site=$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo 'import sqlite_writelock.auto' > "$site/sqlite_writelock_auto.pth"
python app.py   # every program of this environment, unmodified
