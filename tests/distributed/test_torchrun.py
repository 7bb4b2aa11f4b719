"""Tensor parallelism x replicas launched as clusters launch it: two `torchrun` jobs of 2 gloo
ranks each (`levante serve --tensor-parallel 2`), the built-in front over both (`--upstream`),
give one process's greedy tokens from either replica."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from levante.bundle import load
from levante.distributed.replicas import create_front
from levante.engine.engine import Engine
from tests.distributed.test_replicas import _serving
from tests.distributed.test_tensor_parallel import (  # noqa: F401 - the fixture, imported
    ENGINE,
    MAX_LEN,
    PROMPTS,
    _greedy,
    tiny_mistral_8x2,
)
from tests.server.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]  # two torchrun jobs of 2 ranks: ~30 s on 2 cores
NUM_TOKENS = 6


def _torchrun_job(ref: Path, port: int) -> subprocess.Popen[bytes]:
    """`torchrun --standalone --nproc-per-node 2 -m levante.cli serve REF -tp 2` on `port`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "levante.cli", "serve", str(ref),
               "--tensor-parallel", "2", "--port", str(port), "--served-model-name", "tiny",
               "--max-model-len", str(MAX_LEN), "--kv-cache-dtype", "float32", "--no-web"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def front_url(tiny_mistral_8x2: Path) -> Iterator[str]:  # noqa: F811 - the imported fixture
    ports = [free_port(), free_port()]
    jobs = [_torchrun_job(tiny_mistral_8x2, port) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + 300
        for job, url in zip(jobs, urls):
            while True:
                assert job.poll() is None, f"torchrun job for {url} exited ({job.returncode})"
                assert time.monotonic() < deadline, f"{url} did not come up"
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        with _serving(create_front(urls, prefix_aware=False)) as front:
            yield front
    finally:
        for job in jobs:
            os.killpg(job.pid, signal.SIGTERM)
        for job in jobs:
            try:
                job.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)


def test_two_torchrun_replicas_of_two_ranks_give_one_process_greedy_tokens(
        front_url: str, tiny_mistral_8x2: Path) -> None:  # noqa: F811 - the imported fixture
    reference = load(str(tiny_mistral_8x2), max_seq_len=MAX_LEN)
    engine = Engine(reference.model, reference.tokenizer, ENGINE)
    expected = [reference.tokenizer.decode(ids) for ids in _greedy(engine, PROMPTS, NUM_TOKENS)]
    for attempt in range(4):  # least in flight, rotating among equals: both replicas answer
        r = httpx.post(front_url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": PROMPTS[attempt % 2], "max_tokens": NUM_TOKENS,
            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[attempt % 2]
    routed = httpx.get(front_url + "/metrics").text
    assert routed.count("levante_front_requests_routed_total{") == 2
    assert " 0.0" not in "".join(line for line in routed.splitlines()
                                 if line.startswith("levante_front_requests_routed_total{"))
