"""A live Levante server on loopback (in this process, so tests can inspect the engine)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class LiveServer:
    base_url: str
    state: object  # levante.server.routes.ServerState
    config: object
    server: object = None  # levante.server.listener.DrainingServer

    @property
    def engine(self):  # the sync Engine inside the AsyncEngine
        return self.state.engine.engine

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request is running, waiting or being handed over."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.engine.has_work and self.state.engine.num_active == 0:
                return
            time.sleep(0.05)
        raise AssertionError("engine still busy")


def fail_model_step(server: LiveServer, monkeypatch, *, on_call: int, message: str) -> None:
    """Make the engine's `on_call`-th model step (1-based) raise RuntimeError(message); the
    steps before and after it run as usual."""
    runner = server.engine.runner
    original = runner.run
    calls = {"n": 0}

    def failing(batch):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise RuntimeError(message)
        return original(batch)

    monkeypatch.setattr(runner, "run", failing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ref: str, bundle=None, **overrides) -> Iterator[LiveServer]:
    from levante.server.app import create_app
    from levante.server.config import ServerConfig
    from levante.server.listener import build_server
    from levante.server.routes import ServerState

    config = ServerConfig(ref=ref, port=free_port(), **overrides)
    state = ServerState.build(config, bundle)
    app = create_app(config, state)
    server = build_server(app, config, state.engine, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{config.port}", state, config, server)
    finally:
        server.should_exit = True
        thread.join(10)
        _forget_fastapi_caches()


def _forget_fastapi_caches() -> None:
    """FastAPI keeps endpoint functions in module-level lru_caches (fastapi.dependencies.models),
    and ours close over the ServerState: every server a test process started kept its engine
    and the KV pages it had written (~350 MB each). One app per process, as `levante serve`
    runs, never notices."""
    from fastapi.dependencies import models

    for value in vars(models).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_gguf: Path):
    from levante.bundle import load

    return load(str(smollm2_gguf), max_seq_len=2048)


@pytest.fixture(scope="module")
def server(smollm2_bundle) -> Iterator[LiveServer]:
    yield from start_server("smollm2", smollm2_bundle, max_num_seqs=8, max_queue=64)
