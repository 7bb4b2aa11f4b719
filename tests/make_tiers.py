"""Write tests/slow_tests.txt from a full run's durations: the slowest tests until the rest fit.

`make test` runs the fast tier (every test not marked slow); `make test-slow` runs the slow
tier; CI runs both. A test is slow when marked `@pytest.mark.slow` in its file (a reason
beside it), or when listed in slow_tests.txt, which this script regenerates:

    .venv/bin/python -m pytest -m "slow or not slow" -q --durations=0 -p no:randomly \
        > /tmp/durations.txt
    .venv/bin/python tests/make_tiers.py /tmp/durations.txt [--fast-share 0.12] [--keep FILE]

or, from a run of the fast tier alone (`make test PYTEST_ARGS=--durations=0`), move more files
into the slow tier until the rest take `--fast-share` of that run: `--from-fast-run`; with
`--by-test SECONDS`, move single tests instead (the slowest calls first) until the rest take at
most SECONDS: a file keeps its cheap tests, and its fixtures, in the fast tier.

It sums each test's setup, call and teardown per file, then lists the slowest files until the
others take at most `--fast-share` of the whole run (whole files: a module's shared fixtures
are charged to its first test, so a split file's fast tests would still pay for them).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([\d.]+)s (setup|call|teardown)\s+(\S+)")
HEADER = """\
# The slow tier: tests `make test` leaves to `make test-slow` (CI runs both).
# Written by tests/make_tiers.py from a full run's --durations; regenerate, don't hand-edit.
# Test files (a line may also be one node id, "path::test").
"""


def read_durations(text: str) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            seconds[match.group(3)] += float(match.group(1))
    return dict(seconds)


def slow_tier(seconds: dict[str, float], fast_share: float,
              keep: frozenset[str] = frozenset()) -> list[str]:
    """Whole files, slowest first, until the other files take at most `fast_share`; files in
    `keep` stay in the fast tier whatever they take.

    Files, not tests: a module's fixtures (a model load, a server start) are charged to its
    first test, so splitting a file between tiers leaves its fast tests paying for them.
    """
    by_file: dict[str, float] = defaultdict(float)
    for node, spent in seconds.items():
        by_file[node.split("::")[0]] += spent
    total = sum(by_file.values())
    fast = total
    slow: list[str] = []
    for path, spent in sorted(by_file.items(), key=lambda item: -item[1]):
        if fast <= fast_share * total:
            break
        if path in keep:
            continue
        slow.append(path)
        fast -= spent
    return sorted(slow)


def slow_tests(seconds: dict[str, float], calls: dict[str, float], budget_s: float,
               keep: frozenset[str] = frozenset()) -> list[str]:
    """Single tests, slowest call first, until the rest take at most `budget_s`. A test's
    setup is not counted as saved: a module fixture charged to it stays with the file."""
    fast = sum(seconds.values())
    slow: list[str] = []
    for node, spent in sorted(calls.items(), key=lambda item: -item[1]):
        if fast <= budget_s:
            break
        if node in keep or node.split("::")[0] in keep:
            continue
        slow.append(node)
        fast -= spent
    return sorted(slow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("durations", type=Path)
    parser.add_argument("--fast-share", type=float, default=0.12)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="append", default=[], metavar="FILE",
                        help="a test file (or, with --by-test, a test) that stays in the "
                             "fast tier (repeatable)")
    parser.add_argument("--from-fast-run", action="store_true",
                        help="the durations are of a fast-tier run only: keep the files "
                             "slow_tests.txt lists and move more until the rest fit")
    parser.add_argument("--by-test", type=float, default=None, metavar="SECONDS",
                        help="with --from-fast-run: move single tests until the rest take "
                             "at most SECONDS")
    args = parser.parse_args()
    text = args.durations.read_text()
    seconds = read_durations(text)
    if not seconds:
        raise SystemExit(f"{args.durations}: no '--durations=0' lines found")
    out = args.out or Path(__file__).with_name("slow_tests.txt")
    if args.by_test is not None:
        calls = read_durations("\n".join(line for line in text.splitlines()
                                          if " setup " not in line))
        lines = slow_tests(seconds, calls, args.by_test, frozenset(args.keep))
    else:
        lines = slow_tier(seconds, args.fast_share, frozenset(args.keep))
    if args.from_fast_run:
        listed_before = [line.split("#")[0].strip() for line in
                         Path(__file__).with_name("slow_tests.txt").read_text().splitlines()]
        lines = sorted({*lines, *filter(None, listed_before)})
    listed = set(lines)
    fast = sum(s for n, s in seconds.items()
               if n not in listed and n.split("::")[0] not in listed)
    out.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"{len(seconds)} tests, {sum(seconds.values()):.0f} s; fast tier {fast:.0f} s; "
          f"{len(lines)} lines -> {out}")


if __name__ == "__main__":
    main()
