"""The Ray launchers, the only package that starts actors: per-model Tune search (search.py), sweeps
over many models (sweep.py) and method comparisons (compare.py)."""
