"""The errors a user meets: each message is one line that names the file or the flag and the fix.
training.run prints it without a traceback and exits with code 2."""


class LoadError(Exception):
    """A file (weights, a checkpoint, data) that cannot be used as it is."""


class UsageError(Exception):
    """A flag or setting that cannot work (a zero batch, an unknown choice, an out_dir that is a file)."""
