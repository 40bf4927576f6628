"""Sub-commands of ``centre-node``; each module exposes ``register(app: typer.Typer)``."""
