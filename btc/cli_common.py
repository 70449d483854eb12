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


def writable_folder(path: Path, what: str = "output folder") -> Path:
    """``path``, once it is known that it can be a folder this process writes into; exit 2 saying why not.

    Checked before any work, so a long job never fails at its last step. Nothing is created: the
    nearest existing folder on the way is where a test file is written (and removed).
    """
    import tempfile

    path = Path(path)
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise fail(f"{what} {str(path)!r} exists and is not a folder" if existing == path
                   else f"{what} {str(path)!r} cannot be made: {str(existing)!r} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise fail(f"cannot write into {what} {str(path)!r}: {str(existing)!r}: {err.strerror or err}") from None
    return path


def writable_file(path: Path, what: str = "output file") -> Path:
    """``path``, once it is known that it can be written as a file (see :func:`writable_folder`); exit 2 saying why not."""
    path = Path(path)
    if path.is_dir():
        raise fail(f"{what} {str(path)!r} is a folder; give a file name")
    writable_folder(path.parent, f"folder of the {what}")
    return path
