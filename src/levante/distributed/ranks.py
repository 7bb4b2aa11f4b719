"""A tensor-parallel rank's side: join the group, load its shard, run each step rank 0 sends.

Every rank, rank 0 included, joins the process group (`init_rank`: model collectives on NCCL on
CUDA, gloo on CPU, and a gloo control group), loads its shard (`load_rank`) and reports to
rank 0, which decides for all whether to go on (`handshake`). Ranks 1..N-1 (`run_worker`:
spawned by rank 0, Ray actors, or started by `torchrun` for several machines) then loop:
receive a message over the control group (a `CacheSetup`, a `StepBatch`, or None to leave),
run the same `ModelRunner.run` on it in lockstep (their all-reduces meet rank 0's), discard
the logits. Rank 0's side: levante.distributed.launch.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from levante.bundle import checkpoint_dtype
from levante.distributed.loading import load_parallel_model
from levante.distributed.parallel import weight_bytes
from levante.engine.kv_cache import KVCache
from levante.engine.runner import ModelRunner
from levante.engine.scheduler import Batch
from levante.errors import ConfigError, LevanteError
from levante.load_config import DTYPES, LoadConfig
from levante.model import Transformer
from levante.weights.hub import resolve

log = logging.getLogger(__name__)
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


def init_rank(rank: int, local_rank: int,
              spec: LaunchSpec) -> tuple[torch.device, dist.ProcessGroup]:
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


def load_rank(rank: int, spec: LaunchSpec,
              device: torch.device) -> tuple[Transformer | None, RankReport]:
    """This rank's shard of the model (None if it failed) and its report for `handshake`."""
    try:
        model = load_parallel_model(Path(spec.path), rank=rank, world_size=spec.world_size,
                                    dtype=DTYPES[spec.dtype], device=device,
                                    max_seq_len=spec.max_seq_len)
    except (LevanteError, OSError, RuntimeError) as e:  # reported to rank 0, which raises
        log.exception("rank %d failed to load its shard", rank)
        return None, RankReport(rank, 0, f"{type(e).__name__}: {e}")
    return model, RankReport(rank, weight_bytes(model))


def handshake(report: RankReport, control: dist.ProcessGroup) -> tuple[bool, list[RankReport]]:
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
    device, control = init_rank(rank, rank if local_rank is None else local_rank, spec)
    try:
        model, report = load_rank(rank, spec, device)
        is_go, _ = handshake(report, control)
        if is_go and model is not None:
            _serve_steps(model, control, device)
    finally:
        dist.destroy_process_group()


def spawned_worker(rank: int, spec: LaunchSpec) -> None:
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
