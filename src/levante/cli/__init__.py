"""The `levante` command: thin typer handlers over the library, printed with rich.

The handlers live in three rooms: models (pull, list, run, generate, serve), measure (bench,
eval, cost) and shrink (quantize, plan, finetune); each adds its commands to the app of
levante.cli.typer_app when imported, which this module does.

Those three modules do not use `from __future__ import annotations`: typer builds every
command's options from their annotations at each start, and with string annotations it
eval()s each one: typer.main.get_command took 37-54 ms, 7-16 ms without (2 cores).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from levante.cli import measure, models, shrink, typer_app  # noqa: F401 (registers commands)
from levante.cli.typer_app import app


def main() -> None:  # pragma: no cover - console entry point (tests/test_cli.py runs it)
    typer_app.process_lifetime = []  # freed by the OS at _exit, not object by object
    try:
        app()  # typer ends with SystemExit, its exit code
    except SystemExit as e:
        _exit(e.code)
    _exit(0)


def _exit(code: object) -> None:
    """Exit as Python would, without its interpreter teardown.

    Once PyTorch is imported, tearing down the interpreter's modules takes ~0.5 s on 2 cores
    (of a ~3 s `levante generate`): a process that only imports torch spends 0.42-0.59 s in
    exit, 0.03-0.05 s with this. What exit does that matters still happens here: other
    non-daemon threads are waited for, atexit handlers run (Ray's shutdown, logging's flush,
    temporary folders' finalizers), stdout and stderr are flushed. What is skipped is freeing
    objects and unloading modules, which the OS does at once.
    """
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`levante list | head`)
            status = status or 1
    os._exit(status)
