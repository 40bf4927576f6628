"""Logging configuration for the CLIs (standard ``logging``; rich handler on a terminal)."""

from __future__ import annotations

import logging
import os


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if quiet:
        os.environ["HISTODD_NO_PROGRESS"] = "1"
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        fmt = "%(message)s"
    except ImportError:  # pragma: no cover
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    # The handler filters too: libraries that lower their own logger's level (Flower sets "flwr" to
    # DEBUG) still print nothing below ours unless --verbose.
    handler.setLevel(level)
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)


def progress_enabled() -> bool:
    """Progress bars are shown unless ``--quiet``, ``HISTODD_NO_PROGRESS=1`` or tqdm's own ``TQDM_DISABLE``
    (which tqdm itself ignores once a caller passes ``disable=`` explicitly, as these bars do)."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in {"1", "true", "yes"}:
        return False
    return os.environ.get("HISTODD_NO_PROGRESS", "0") != "1"


def progress(iterable=None, **kwargs):
    """A tqdm progress bar that honours ``--quiet``."""
    from tqdm.auto import tqdm

    # --quiet (or HISTODD_NO_PROGRESS=1) wins over a caller that asked for a bar.
    kwargs["disable"] = bool(kwargs.get("disable", False)) or not progress_enabled()
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
