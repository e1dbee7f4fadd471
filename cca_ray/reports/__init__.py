"""Reports of each command: a run's report (run.py), a sweep's (sweep.py), a comparison's
(compare.py), and the figures they share (plots.py)."""
