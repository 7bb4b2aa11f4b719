"""The typer app the command modules add their handlers to, and what those handlers share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run, serve, tune, evaluate and cost out Mistral Small 3 and its kin.")


class LazyConsole:
    """rich's Console, made at its first use.

    Importing rich.console costs 0.09 s on 2 cores (measured with -X importtime), ~4% of a
    cold `levante generate`, which prints plain text and needs none of it. Commands that print
    tables, markup or progress bars get the same Console as before.
    """

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.get().print(*objects, **kwargs)

    def input(self, prompt: str = "") -> str:
        return self.get().input(prompt)


console = LazyConsole()
err_console = LazyConsole(stderr=True)

# What lives as long as the `levante` process: its entry point (levante.cli.main) sets a list
# here and ends with os._exit, so the OS frees what it holds at once; a loaded model freed
# piece by piece when its command returned took ~25 ms of a ~2 s cold `levante generate`.
# None where the app runs inside another process (the tests' CliRunner): nothing is held.
process_lifetime: list[Any] | None = None


def keep_until_exit(obj: Any) -> Any:
    """`obj`, kept alive until this `levante` process ends (see `process_lifetime`)."""
    if process_lifetime is not None:
        process_lifetime.append(obj)
    return obj

Ref = Annotated[str, typer.Argument(help="registry name, local file/folder, or hub org/repo")]


def fail(exc: Exception) -> None:
    """Print `exc` as the command's error and exit with status 1."""
    # As text, not markup (a message's "[...]" stays), and not wrapped at the terminal's
    # width: a file's path in it stays whole for copy and paste.
    from rich.text import Text

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
