"""The one exception type for bad input; the entry point turns it into one line and exit 2."""


class ConfigError(ValueError):
    """A configuration key or value that cannot work, with what would be accepted instead."""


class Interrupted(Exception):
    """The run was stopped by Ctrl-C after its state was saved; the message says how to resume."""
