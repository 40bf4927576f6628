"""``centre-node``: what a hospital runs on its own machine.

Thin: every command parses options and calls into ``histodd_fed``. Errors derived from
``HistoddError`` are printed as one line and exit with status 2.
"""

from __future__ import annotations

import logging
import sys

import typer

from centre_node.commands import benchmark_data, bundle, distill, evaluate, mil, privacy, slides
from histodd_fed.allocator import keep_freed_memory
from histodd_fed.errors import HistoddError
from histodd_fed.logging_setup import configure_logging
from histodd_fed.process_tree import exit_on_sigterm
from histodd_fed.terminal import error_line

app = typer.Typer(
    name="centre-node",
    help=(
        "A hospital's node of histodd-fed: make or tile slides, distil them into a few synthetic "
        "patches (Histo-DD), seal them into an encrypted signed bundle, open bundles from other "
        "centres, evaluate, audit privacy."
    ),
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
    keep_freed_memory()  # tensor buffers reused, not page-faulted anew every step (here and in children)
    exit_on_sigterm()  # `kill` unwinds like Ctrl-C: worker pools and Flower processes stopped, temp files removed


for _module in (slides, distill, bundle, evaluate, mil, privacy, benchmark_data):
    _module.register(app)


def main() -> None:
    try:
        app()
    except HistoddError as exc:
        logging.getLogger("centre-node").debug("error", exc_info=True)
        typer.echo(error_line(exc), err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
