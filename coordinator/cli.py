"""``coordinator``: drives cross-centre transfer studies through Flower (being written)."""

from __future__ import annotations

import logging
import sys

import typer

from histodd_fed.errors import HistoddError
from histodd_fed.logging_setup import configure_logging

app = typer.Typer(
    name="coordinator",
    help="Relays sealed bundles between centres through Flower and writes transfer-study reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings only; no progress bars."),
) -> None:
    configure_logging(verbose=verbose, quiet=quiet)


def main() -> None:
    try:
        app()
    except HistoddError as exc:
        logging.getLogger("coordinator").debug("error", exc_info=True)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
