python -m pip install sqlite-writelock   # the library and the writelock command; no compiler needed
