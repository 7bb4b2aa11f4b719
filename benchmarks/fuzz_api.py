"""A longer schemathesis run of tests/server/test_fuzz_api.py: more cases, fresh random ones.

Usage: .venv/bin/python benchmarks/fuzz_api.py [--examples 500] [--seconds-per-operation 120]
Runs the suite's fuzz test (our /openapi.json against a live in-process server; no 5xx, errors
in OpenAI's or Ollama's shape, nothing leaked after) with bigger budgets and new random cases
each run, and prints the number of cases per operation and the statuses seen.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="cases per operation")
    parser.add_argument("--seconds-per-operation", type=float, default=120)
    parser.add_argument("--replay", action="store_true", help="the suite's fixed cases")
    args = parser.parse_args()
    env = {**os.environ, "LEVANTE_FUZZ_EXAMPLES": str(args.examples),
           "LEVANTE_FUZZ_SECONDS": str(args.seconds_per_operation),
           "LEVANTE_FUZZ_RANDOM": "0" if args.replay else "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
               "tests/server/test_fuzz_api.py"]
    print(f"fuzz_api: up to {args.examples} cases and {args.seconds_per_operation:g} s per "
          f"operation, {'fixed' if args.replay else 'random'} cases", flush=True)
    sys.exit(subprocess.run(command, cwd=ROOT, env=env, check=False).returncode)


if __name__ == "__main__":
    main()
