"""The typer app the command modules add their handlers to, and what those handlers share."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run, serve, tune, evaluate and cost out Mistral Small 3 and its kin.")
console = Console()
err_console = Console(stderr=True)

Ref = Annotated[str, typer.Argument(help="registry name, local file/folder, or hub org/repo")]


def fail(exc: Exception) -> None:
    """Print `exc` as the command's error and exit with status 1."""
    # As text, not markup (a message's "[...]" stays), and not wrapped at the terminal's
    # width: a file's path in it stays whole for copy and paste.
    err_console.print(Text.assemble(("error:", "red"), f" {exc}"), highlight=False,
                      soft_wrap=True)
    raise typer.Exit(code=1)


def sampling_params(max_tokens: int | None, temperature: float, top_p: float,
                    top_k: int | None, seed: int | None, stop: list[str] | None) -> Any:
    """The SamplingParams the sampling flags ask for."""
    from levante.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, seed=seed, stop=tuple(stop or ()))


def parse_size(text: str | None) -> int | None:
    """'2GB' / '512MiB' / '1e9' -> bytes."""
    if text is None:
        return None
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
             "gib": 2**30, "tib": 2**40, "b": 1}
    lowered = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if lowered.endswith(unit):
            number = lowered[:-len(unit)].strip()
            break
    else:
        unit, number = "b", lowered
    try:
        return int(float(number) * units[unit])
    except ValueError:
        from levante.errors import ConfigError

        raise ConfigError(f"cannot read size {text!r} (try 2GB or 512MiB)") from None
