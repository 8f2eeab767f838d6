"""Command-line entry points (see pyproject.toml [project.scripts])."""
