"""Helpers every CLI module shares: a red error line with an exit code, and loading the config."""

from __future__ import annotations

from pathlib import Path

import typer


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` to stderr and return the Exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def config_or_fail(config: Path | None, overrides: list[str] | None, run_config: Path | None = None):
    """The config from a YAML file and overrides, or exit 2 with the reason.

    ``run_config``: without ``--config``, start from this file if it exists (the config.yaml of
    the run being resumed or evaluated), so the run keeps the settings it was made with.
    """
    from btc.config import ConfigError, load_config

    if config is None and run_config is not None and run_config.is_file():
        config = run_config
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        raise fail(str(err)) from None
