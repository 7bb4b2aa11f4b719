"""The `levante` command: thin typer handlers over the library, printed with rich.

The handlers live in three rooms: models (pull, list, run, generate, serve), measure (bench,
eval, cost) and shrink (quantize, plan, finetune); each adds its commands to the app of
levante.cli.typer_app when imported, which this module does.
"""

from __future__ import annotations

from levante.cli import measure, models, shrink  # noqa: F401 (registers their commands)
from levante.cli.typer_app import app


def main() -> None:  # pragma: no cover - console entry point
    app()
