"""The base of every error in what a user gave (a config, a data file, a model, a run's state): the
command line prints its message, which names the bad input and the fix, and exits 2. Kept free of
heavy imports, so `cca-ray --help` does not load torch."""


class UserError(Exception):
    """An error whose message is for the user (bad input, and what to do about it), not a bug."""
