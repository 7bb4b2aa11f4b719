"""Tensor-parallel processes: Levante spawns one per rank; rank 0 schedules, all run each step.

Rank 0 is the calling process: it owns the `Engine` (scheduler, sampler, tokenizer) and
swaps the engine's runner for a `DistributedRunner`, which broadcasts each step's batch (a
small picklable `StepBatch`: token ids, positions' origin, block tables) over a gloo
control group before running the step itself. Ranks 1..N-1 (spawned with
`torch.multiprocessing`, or started by `torchrun` for several machines) load their shard,
then loop: receive a message, run the same `ModelRunner.run` on it in lockstep (their
all-reduces meet rank 0's), discard the logits. Model collectives use NCCL on CUDA and gloo
on CPU. A worker that dies fails the next step's requests with a message naming its rank.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from levante.bundle import Bundle, checkpoint_dtype
from levante.config import EngineConfig
from levante.distributed.loading import load_parallel_model, read_model_config, sharded_bundle
from levante.distributed.parallel import check_tensor_parallel, weight_bytes
from levante.engine.engine import Engine
from levante.engine.kv_budget import kv_pool_blocks
from levante.engine.kv_cache import KVCache
from levante.engine.runner import ModelRunner
from levante.engine.scheduler import Batch
from levante.errors import ConfigError, LevanteError
from levante.load_config import DTYPES, LoadConfig
from levante.model import Transformer
from levante.weights.hub import resolve

if TYPE_CHECKING:
    from levante.server.app import ServerConfig
    from levante.server.routes import ServerState

log = logging.getLogger(__name__)
# Starts ranks 1..N-1 of a spec; each handle has multiprocessing.Process's is_alive, exitcode,
# join, terminate, kill and name.
RankStarter = Callable[["LaunchSpec"], list[Any]]
IDLE_TIMEOUT = timedelta(days=365)  # workers wait on the control group while the server idles


@dataclass(frozen=True)
class LaunchSpec:
    """What every rank needs to start: the checkpoint, the world, the rendezvous."""

    path: str
    world_size: int
    dtype: str = "float32"  # concrete (`tensor_parallel_config`)
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (NCCL, one GPU per rank)
    max_seq_len: int | None = None
    init_method: str = "env://"
    timeout_s: float = 600.0  # model collectives and the start-up handshake


@dataclass(frozen=True)
class RequestView:
    """What the runner reads of one `Request` for one step, small enough to broadcast."""

    num_computed_tokens: int
    num_tokens: int
    token_ids: tuple[int, ...]  # positions [num_computed_tokens, + len) this step runs
    draft_ids: list[int]
    block_ids: list[int]
    num_prompt_tokens: int = 0
    scores_prompt: bool = False  # every rank computes the prompt's logits alike (collectives)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens at positions [start, stop); only the step's own range is known."""
        assert start == self.num_computed_tokens and stop - start <= len(self.token_ids)
        return list(self.token_ids[:stop - start])


@dataclass(frozen=True)
class StepBatch:
    """A `Batch` as the runner sees it: what rank 0 broadcasts each step."""

    requests: tuple[RequestView, ...]
    num_new_tokens: tuple[int, ...]

    @classmethod
    def of(cls, batch: Batch) -> StepBatch:
        """The views of a scheduled batch (the tokens `ModelRunner.run` will ask for)."""
        views = []
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            start = request.num_computed_tokens
            stop = start + num_new - len(request.draft_ids)
            views.append(RequestView(start, request.num_tokens,
                                     tuple(request.token_slice(start, stop)),
                                     list(request.draft_ids), list(request.block_ids),
                                     request.num_prompt_tokens, request.scores_prompt))
        return cls(tuple(views), tuple(batch.num_new_tokens))


@dataclass(frozen=True)
class CacheSetup:
    """Workers (re)build their KV cache: same block count and size as rank 0's engine."""

    num_blocks: int
    block_size: int
    dtype: str


@dataclass(frozen=True)
class RankReport:
    """A rank's start-up result: its resident weight bytes, or why it failed."""

    rank: int
    weight_bytes: int
    error: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_rank(rank: int, local_rank: int, spec: LaunchSpec) -> tuple[torch.device,
                                                                      dist.ProcessGroup]:
    """Join the process group; returns this rank's device and the gloo control group."""
    if spec.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:  # ranks on one host share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
        device = torch.device("cpu")
    dist.init_process_group("nccl" if spec.device == "cuda" else "gloo",
                            init_method=spec.init_method, rank=rank,
                            world_size=spec.world_size,
                            timeout=timedelta(seconds=spec.timeout_s))
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return device, control


def _load(rank: int, spec: LaunchSpec, device: torch.device) -> tuple[Transformer | None,
                                                                      RankReport]:
    try:
        model = load_parallel_model(Path(spec.path), rank=rank, world_size=spec.world_size,
                                    dtype=DTYPES[spec.dtype], device=device,
                                    max_seq_len=spec.max_seq_len)
    except (LevanteError, OSError, RuntimeError) as e:  # reported to rank 0, which raises
        log.exception("rank %d failed to load its shard", rank)
        return None, RankReport(rank, 0, f"{type(e).__name__}: {e}")
    return model, RankReport(rank, weight_bytes(model))


def _handshake(report: RankReport, control: dist.ProcessGroup) -> tuple[bool, list[RankReport]]:
    """Gather every rank's report on rank 0 and agree whether to go on.

    Returns the verdict (the same on every rank) and, on rank 0, all reports.
    """
    is_rank0 = dist.get_rank() == 0
    reports: list[Any] = [None] * dist.get_world_size()
    dist.gather_object(report, reports if is_rank0 else None, dst=0, group=control)
    verdict = [not is_rank0 or all(r.error is None for r in reports)]
    dist.broadcast_object_list(verdict, src=0, group=control)
    return bool(verdict[0]), reports if is_rank0 else []


def _serve_steps(model: Transformer, control: dist.ProcessGroup, device: torch.device) -> None:
    """A worker's loop: run every step rank 0 broadcasts, until it sends None."""
    runner: ModelRunner | None = None
    while True:
        message: list[Any] = [None]
        try:
            dist.broadcast_object_list(message, src=0, group=control)
        except RuntimeError as e:  # gloo: "Connection closed by peer"
            log.error("rank 0 went away (%s); this worker exits", str(e).splitlines()[0])
            return
        item = message[0]
        if item is None:
            return
        if isinstance(item, CacheSetup):
            runner = None  # free the old cache before allocating the new one
            cache = KVCache(model.config, num_blocks=item.num_blocks,
                            block_size=item.block_size, dtype=item.dtype,
                            device=device)
            runner = ModelRunner(model, cache)
        else:
            assert runner is not None, "a step arrived before the KV cache was set up"
            runner.run(item)


def run_worker(rank: int, spec: LaunchSpec, *, local_rank: int | None = None) -> None:
    """Rank `rank`'s whole life (rank >= 1): join, load the shard, serve steps, leave."""
    logging.basicConfig(level=logging.INFO, format=f"rank {rank} %(levelname)s: %(message)s")
    device, control = _init_rank(rank, rank if local_rank is None else local_rank, spec)
    try:
        model, report = _load(rank, spec, device)
        is_go, _ = _handshake(report, control)
        if is_go and model is not None:
            _serve_steps(model, control, device)
    finally:
        dist.destroy_process_group()


def _spawned_worker(rank: int, spec: LaunchSpec) -> None:
    """Entry point of a spawned rank: `run_worker`, then exit at once.

    A plain return spent 8-13 s in interpreter teardown here (native threads, after the
    group was destroyed); everything worth keeping is flushed first.
    """
    run_worker(rank, spec)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun_rank() -> int | None:
    """This process's rank when started by `torchrun` (RANK and WORLD_SIZE set), else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ \
        else None


def tensor_parallel_config(load_config: LoadConfig, path: Path) -> LoadConfig:
    """`load_config` made concrete for tensor-parallel ranks of the checkpoint at `path`.

    Ranks compute float shards on the CPU (gloo) or on one GPU each (NCCL): device auto
    picks CUDA, else the CPU; dtype auto keeps the checkpoint's precision (a quantized GGUF
    is dequantized to the device's default). MPS, an indexed GPU (each rank takes its local
    one) and quantized weights are refused, naming the flag.
    """
    if load_config.device == "mps" or load_config.device.startswith("cuda:"):
        raise ConfigError(f"--tensor-parallel runs on cpu (gloo) or cuda (NCCL, each rank "
                          f"on its local GPU), not --device {load_config.device}")
    if load_config.quant not in ("auto", "none"):
        raise ConfigError(f"--tensor-parallel computes float shards; --quant "
                          f"{load_config.quant} is not supported with it")
    if load_config.device == "auto":
        load_config = load_config.replace(device="cuda" if torch.cuda.is_available() else "cpu")
        log.info("tensor parallel: device auto: %s", load_config.device)
    return load_config.on_device().replace(quant="none").with_dtype(checkpoint_dtype(path))


def run_torchrun_worker(ref: str, load_config: LoadConfig | None = None) -> None:
    """A non-zero `torchrun` rank's life: `torchrun --nproc-per-node G [--nnodes ...]
    levante serve REF --tensor-parallel N` runs this on ranks 1..N-1 and serves on rank 0."""
    rank = torchrun_rank()
    if rank is None or rank == 0:
        raise ConfigError("run_torchrun_worker is for torchrun ranks 1..N-1 (RANK unset or 0)")
    path = resolve(ref)
    concrete = tensor_parallel_config(load_config or LoadConfig(), path)
    spec = LaunchSpec(str(path), int(os.environ["WORLD_SIZE"]), concrete.dtype,
                      concrete.device, concrete.max_model_len, "env://")
    run_worker(rank, spec, local_rank=int(os.environ.get("LOCAL_RANK", rank)))


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
            workers = [context.Process(target=_spawned_worker, args=(rank, spec), daemon=True,
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
            device, control = _init_rank(0, int(os.environ.get("LOCAL_RANK", "0")), spec)
            model, report = _load(0, spec, device)
            is_go, reports = _handshake(report, control)
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
