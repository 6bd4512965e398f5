"""The errors a user can fix. Every command-line tool prints one of these as a single line and exits 2
(``tryon_ds/cli.py``); anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """An error caused by the user's input (config, files, data, command line)."""


class ConfigError(UserError, ValueError):
    """A user error in the configuration: the message names the key, the value and what is allowed."""


class DataError(UserError):
    """Training or validation data that cannot be used: no shards, or nothing readable in them."""
