"""User-facing errors: one line, names what is wrong and how to fix it.

CLI entry points catch `UserError` and print `error: <message>` with exit
status 2 instead of a traceback (see `perspective_jax.cli.common`).
"""


class UserError(Exception):
    """A problem with user input (config, flag, file, prompt) — never a bug."""


class ConfigError(UserError):
    """An invalid configuration value, key or file."""
