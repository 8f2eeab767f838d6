"""Fixtures of the serve tests (helpers in serve_helpers.py)."""

from serve_helpers import served  # noqa: F401
