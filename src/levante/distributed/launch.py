"""Tensor-parallel processes: Levante spawns one per rank; rank 0 schedules, all run each step.

Rank 0 is the calling process: it owns the `Engine` (scheduler, sampler, tokenizer) and
swaps the engine's runner for a `DistributedRunner`, which broadcasts each step's batch (a
small picklable `StepBatch`: token ids, positions' origin, block tables) over a gloo
control group before running the step itself. Ranks 1..N-1 (spawned with
`torch.multiprocessing`, started some other way, or by `torchrun` for several machines) load
their shard and run the same steps in lockstep: levante.distributed.ranks. A worker that dies
fails the next step's requests with a message naming its rank.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from levante.bundle import Bundle
from levante.config import EngineConfig
from levante.distributed.loading import read_model_config, sharded_bundle
from levante.distributed.parallel import check_tensor_parallel
from levante.distributed.ranks import (
    CacheSetup,
    LaunchSpec,
    RankReport,
    StepBatch,
    handshake,
    init_rank,
    load_rank,
    run_torchrun_worker,
    spawned_worker,
    tensor_parallel_config,
    torchrun_rank,
)
from levante.engine.engine import Engine
from levante.engine.kv_budget import kv_pool_blocks
from levante.engine.kv_cache import KVCache
from levante.engine.runner import ModelRunner
from levante.engine.scheduler import Batch
from levante.errors import ConfigError
from levante.load_config import LoadConfig
from levante.model import Transformer
from levante.weights.hub import resolve

if TYPE_CHECKING:
    from levante.server.config import ServerConfig
    from levante.server.routes import ServerState

log = logging.getLogger(__name__)
# Starts ranks 1..N-1 of a spec; each handle has multiprocessing.Process's is_alive, exitcode,
# join, terminate, kill and name.
RankStarter = Callable[[LaunchSpec], list[Any]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TensorParallelGroup:
    """Rank 0's handle on N ranks: the sharded Bundle, the workers, and the step broadcast."""

    def __init__(self, spec: LaunchSpec, bundle: Bundle, control: dist.ProcessGroup,
                 workers: list[Any], reports: list[RankReport], num_threads: int) -> None:
        self.spec = spec
        self.bundle = bundle
        self.control = control
        self.workers = workers
        self.weight_bytes = [r.weight_bytes for r in reports]  # per rank, rank 0 first
        self._num_threads = num_threads  # this process's torch threads before we joined
        self.is_closed = False

    @classmethod
    def start(cls, ref: str, *, tensor_parallel: int, load_config: LoadConfig | None = None,
              timeout_s: float = 600.0, start_ranks: RankStarter | None = None,
              host: str = "127.0.0.1") -> TensorParallelGroup:
        """Check the model divides by N, spawn ranks 1..N-1, load rank 0's shard here.

        `load_config` (device, dtype, context; `tensor_parallel_config` says what it may
        hold) is made concrete here, once, and every rank loads as it says. Under `torchrun`
        (RANK set) this process must be rank 0 and nothing is spawned: the other ranks call
        `run_worker` themselves. `start_ranks` starts ranks 1..N-1 some other way (Ray actors:
        levante.distributed.ray_ranks), meeting rank 0 at `host` (this node's address).
        """
        path = resolve(ref)
        concrete = tensor_parallel_config(load_config or LoadConfig(), path)
        _, config = read_model_config(path, max_seq_len=concrete.max_model_len)
        check_tensor_parallel(config, tensor_parallel)
        external = torchrun_rank() is not None
        if external and torchrun_rank() != 0:
            raise ConfigError("TensorParallelGroup.start runs on rank 0; other torchrun ranks "
                              "call run_torchrun_worker")
        spec = LaunchSpec(str(path), tensor_parallel, concrete.dtype, concrete.device,
                          concrete.max_model_len,
                          "env://" if external else f"tcp://{host}:{_free_port()}", timeout_s)
        if external:
            workers: list[Any] = []
        elif start_ranks is not None:
            workers = start_ranks(spec)
        else:
            context = mp.get_context("spawn")
            workers = [context.Process(target=spawned_worker, args=(rank, spec), daemon=True,
                                       name=f"levante-tp-rank{rank}")
                       for rank in range(1, tensor_parallel)]
            for worker in workers:
                worker.start()
        return cls._join_as_rank0(ref, spec, workers, concrete)

    @classmethod
    def _join_as_rank0(cls, ref: str, spec: LaunchSpec, workers: list[Any],
                       load_config: LoadConfig) -> TensorParallelGroup:
        num_threads = torch.get_num_threads()
        try:
            device, control = init_rank(0, int(os.environ.get("LOCAL_RANK", "0")), spec)
            model, report = load_rank(0, spec, device)
            is_go, reports = handshake(report, control)
        except BaseException:
            _stop_workers(workers, timeout=1.0)
            raise
        if not is_go or model is None:
            failed = [r for r in reports if r.error]
            _stop_workers(workers, timeout=10.0)
            dist.destroy_process_group()
            torch.set_num_threads(num_threads)
            raise ConfigError("tensor-parallel start failed: " + "; ".join(
                f"rank {r.rank}: {r.error}" for r in failed))
        bundle = dataclasses.replace(sharded_bundle(ref, Path(spec.path), model),
                                     load_config=load_config)
        return cls(spec, bundle, control, workers, reports, num_threads)

    def send(self, item: StepBatch | CacheSetup | None) -> None:
        """Broadcast one message to the workers (they block until it comes)."""
        for rank, worker in enumerate(self.workers, start=1):
            if not worker.is_alive():
                raise RuntimeError(f"tensor-parallel worker rank {rank} exited "
                                   f"(code {worker.exitcode}); restart the server")
        dist.broadcast_object_list([item], src=0, group=self.control)

    def engine_config(self, config: EngineConfig | None = None) -> EngineConfig:
        """`config` (default: the model's context) with the KV pool sized for N ranks.

        On CUDA each rank has its own memory: the engine's sizing holds. On one CPU host the N
        ranks share the budget: `kv_pool_blocks` gives min(wanted, budget / per_block), so N
        times the sequences, divided by N, gives min(wanted, budget / (N * per_block)).
        """
        config = config or EngineConfig(max_model_len=self.bundle.config.max_seq_len)
        model = self.bundle.model
        dtype = model.model.embed_tokens.weight.dtype
        if self.spec.device == "cuda" or config.num_kv_blocks or config.kv_cache_memory:
            return config
        n = self.spec.world_size
        scaled = dataclasses.replace(config, max_num_seqs=config.max_num_seqs * n)
        return dataclasses.replace(config,
                                   num_kv_blocks=max(1, kv_pool_blocks(model, scaled, dtype) // n))

    def attach(self, engine: Engine) -> None:
        """Make `engine` drive all ranks: workers get its cache shape, it gets our runner.

        Call once per engine (the last one attached is the one the workers follow).
        """
        if engine.runner.adapters is not None:
            raise ConfigError("LoRA adapters are not supported with tensor parallelism yet; "
                              "serve a merged checkpoint (levante finetune --merge) instead")
        cache = engine.runner.cache
        self.send(CacheSetup(cache.num_blocks, cache.block_size, cache.kv_dtype))
        engine.runner = DistributedRunner(self, engine.runner.model, cache)

    def engine(self, config: EngineConfig | None = None) -> Engine:
        """A new Engine over the sharded model, sized (`engine_config`) and attached."""
        engine = Engine(self.bundle.model, self.bundle.tokenizer, self.engine_config(config))
        self.attach(engine)
        return engine

    def shutdown(self) -> None:
        """Tell the workers to leave, wait for them, and leave the process group."""
        if self.is_closed:
            return
        self.is_closed = True
        try:
            if all(w.is_alive() for w in self.workers):
                dist.broadcast_object_list([None], src=0, group=self.control)
        finally:
            _stop_workers(self.workers, timeout=30.0)
            dist.destroy_process_group()
            torch.set_num_threads(self._num_threads)

    def __enter__(self) -> TensorParallelGroup:  # noqa: PYI034 - never subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class DistributedRunner(ModelRunner):
    """A `ModelRunner` on rank 0 that first broadcasts the batch, so every rank runs it."""

    def __init__(self, group: TensorParallelGroup, model: Transformer, cache: KVCache) -> None:
        super().__init__(model, cache)
        self.group = group

    def run(self, batch: Batch | StepBatch) -> tuple[torch.Tensor, list[int]]:
        """Same contract as `ModelRunner.run`; workers compute the same step in lockstep."""
        step = batch if isinstance(batch, StepBatch) else StepBatch.of(batch)
        self.group.send(step)
        return super().run(step)  # type: ignore[arg-type]  # duck-typed Batch


def _stop_workers(workers: list[Any], *, timeout: float) -> None:
    for worker in workers:
        worker.join(timeout)
    for worker in workers:
        if worker.is_alive():
            log.warning("tensor-parallel worker %s did not exit; terminating it", worker.name)
            worker.terminate()
            worker.join(5.0)


@contextmanager
def tensor_parallel_llm(ref: str, *, tensor_parallel: int, load_config: LoadConfig | None = None,
                        engine_config: EngineConfig | None = None) -> Iterator[Any]:
    """An `LLM` whose engine drives N tensor-parallel ranks; the ranks stop on exit."""
    from levante.llm import LLM

    with TensorParallelGroup.start(ref, tensor_parallel=tensor_parallel,
                                   load_config=load_config) as group:
        engine_config = engine_config or EngineConfig(
            max_model_len=group.bundle.config.max_seq_len,
            kv_cache_memory=group.bundle.load_config.kv_cache_memory)
        llm = LLM(group.bundle, engine_config=group.engine_config(engine_config))
        group.attach(llm.engine)
        yield llm


def server_state(group: TensorParallelGroup, config: ServerConfig) -> ServerState:
    """The server's state over the group's model, its engine attached, KV sized per rank."""
    from levante.server.routes import ServerState

    wanted = EngineConfig(max_model_len=group.bundle.config.max_seq_len,
                          max_num_seqs=config.max_num_seqs,
                          kv_cache_memory=config.kv_cache_memory,
                          num_kv_blocks=config.num_kv_blocks)
    sized = group.engine_config(wanted)
    state = ServerState.build(dataclasses.replace(config, num_kv_blocks=sized.num_kv_blocks),
                              group.bundle)
    group.attach(state.engine.engine)
    return state


def serve_tensor_parallel(config: ServerConfig, *, tensor_parallel: int) -> None:
    """`levante serve --tensor-parallel N`: as `levante.server.app.serve`, over N ranks."""
    from levante.server.app import check_port_free, create_app
    from levante.server.listener import build_server

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if config.lora:
        raise ConfigError("--lora is not supported with --tensor-parallel yet")
    if torchrun_rank() not in (None, 0):
        run_torchrun_worker(config.ref, config.load_config)
        return
    check_port_free(config.host, config.port)  # before N ranks load the model
    with TensorParallelGroup.start(config.ref, tensor_parallel=tensor_parallel,
                                   load_config=config.load_config) as group:
        log.info("tensor parallel %d: weight bytes per rank %s", tensor_parallel,
                 group.weight_bytes)
        state = server_state(group, config)
        app = create_app(config, state)
        # A second SIGTERM (the first drains) is re-raised by uvicorn to the previous handler:
        # make that an exception, so leaving this block stops the workers.
        signal.signal(signal.SIGTERM, _raise_system_exit)
        build_server(app, config, state.engine).run()


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
