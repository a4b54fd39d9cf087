python -m pip install ./bindings/python   # from the repository root; cargo builds the library
