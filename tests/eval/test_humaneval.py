"""HumanEval through our sandbox: real problems, canonical solutions pass, bad ones are contained."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from levante.eval.humaneval import (
    STOP,
    Sandbox,
    SandboxLimits,
    check_completions,
    check_program,
    load_problems,
    run_humaneval,
)
from levante.eval.tasks import LocalModel

LIMITS = SandboxLimits(timeout_s=5.0, memory_bytes=256 << 20, max_output_bytes=64 << 10)


@pytest.fixture(scope="module")
def problems() -> list[dict[str, Any]]:
    return load_problems(limit=5)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS)


def test_loads_the_packaged_problems(problems: list[dict[str, Any]]) -> None:
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(5)]
    assert len(load_problems()) == 164


def test_canonical_solutions_pass(problems: list[dict[str, Any]], sandbox: Sandbox) -> None:
    results = check_completions(problems, [p["canonical_solution"] for p in problems], sandbox)
    assert [r.status for r in results] == ["passed"] * 5


def test_wrong_solution_fails(problems: list[dict[str, Any]], sandbox: Sandbox) -> None:
    result = sandbox.run(check_program(problems[0], "    return False\n"))
    assert result.status == "failed" and "AssertionError" in result.stderr


def test_infinite_loop_is_killed(problems: list[dict[str, Any]], sandbox: Sandbox) -> None:
    result = sandbox.run(check_program(problems[0], "    while True:\n        pass\n"))
    assert result.status == "timeout" and not result.passed
    assert LIMITS.timeout_s <= result.duration_s < LIMITS.timeout_s + 3


def test_unbounded_allocation_is_stopped(problems: list[dict[str, Any]],
                                         sandbox: Sandbox) -> None:
    hog = "    hoard = []\n    while True:\n        hoard.append(bytearray(10**7))\n"
    result = sandbox.run(check_program(problems[0], hog))
    assert result.status == "out_of_memory" and "MemoryError" in result.stderr


def test_no_network_no_destructive_calls_and_output_capped(sandbox: Sandbox) -> None:
    net = sandbox.run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n")
    assert net.status == "failed" and "OSError" in net.stderr
    assert sandbox.run("import os\nos.system('true')\n").status == "failed"
    spam = sandbox.run("while True:\n    print('x' * 1000)\n")
    assert spam.status == "output_limit" and len(spam.stdout) == LIMITS.max_output_bytes


def test_runs_in_a_fresh_temp_dir(sandbox: Sandbox) -> None:
    result = sandbox.run("open('scratch.txt', 'w').write('hi')\nprint(__file__)\n")
    assert result.passed
    cwd = Path(result.stdout.strip()).parent
    assert cwd.name.startswith("levante-sandbox-") and not cwd.exists()  # removed afterwards


def test_run_humaneval_scores_pass_at_1(problems: list[dict[str, Any]]) -> None:
    """Five real problems end to end: two correct, one wrong, a hang and a memory hog."""
    answers = {p["prompt"]: p["canonical_solution"] for p in problems[:2]}
    bad = ["    return None\n", "    while True:\n        pass\n",
           "    return [0] * 10**12\n"]
    answers.update({p["prompt"]: b for p, b in zip(problems[2:], bad)})

    class Fake(LocalModel):
        def complete(self, prompts: list[str], *, max_tokens: int,
                     stop: Any) -> list[str]:
            assert tuple(stop) == STOP
            return [answers[p] for p in prompts]

    result = run_humaneval(Fake("fake", SimpleNamespace()), limit=5, limits=LIMITS)
    assert [s["status"] for s in result.samples] == ["passed", "passed", "failed", "timeout",
                                                     "out_of_memory"]
    assert result.metrics[0].name == "pass@1" and result.metrics[0].value == pytest.approx(0.4)
    assert result.metrics[0].stderr == pytest.approx((0.4 * 0.6 / 4) ** 0.5)
    json.dumps(result.to_json())
