python -m sqlite_writelock run app.py --its-args   # an unmodified program (or: run -m module)
