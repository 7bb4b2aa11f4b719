"""Tensor-parallel ranks 1..N-1 as Ray actors in their replica's placement group, on any node.

Under `levante serve --ray --tensor-parallel N` each engine replica reserves a placement group
of N bundles (one per rank; `--ray-cpus` / `--ray-gpus` each); the replica is rank 0 in
bundle 0 and starts ranks 1..N-1 here, one actor per bundle, wherever Ray placed the bundle
(PACK: one node if it fits, else several). Each actor sees the one GPU of its bundle, so every
rank's local device is index 0. `RayRank` gives `TensorParallelGroup` the same handle a
spawned process would (is_alive, exitcode, join, terminate, kill, name).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from levante.distributed.ranks import LaunchSpec, run_worker


class _RankActor:
    """The actor a rank lives in: `run` is `run_worker`'s whole life (join, load, serve)."""

    def run(self, rank: int, spec: LaunchSpec) -> None:
        run_worker(rank, spec, local_rank=0)


class RayRank:
    """One rank actor, handled as `TensorParallelGroup` handles a spawned worker process."""

    def __init__(self, rank: int, actor: Any, done: ray.ObjectRef) -> None:
        self.name = f"levante-tp-rank{rank}"
        self.actor = actor
        self.done = done

    def is_alive(self) -> bool:
        ready, _ = ray.wait([self.done], timeout=0)
        return not ready

    @property
    def exitcode(self) -> int | None:
        """None while running; 0 if `run` returned, 1 if it raised or the actor died."""
        if self.is_alive():
            return None
        try:
            ray.get(self.done)
        except ray.exceptions.RayError:
            return 1
        return 0

    def join(self, timeout: float | None = None) -> None:
        """Wait for `run` to end (at most `timeout` s); an ended rank's actor is released."""
        ready, _ = ray.wait([self.done], timeout=timeout)
        if ready:
            ray.kill(self.actor)

    def terminate(self) -> None:
        ray.kill(self.actor)

    kill = terminate


def start_ray_ranks(spec: LaunchSpec, *, num_cpus: float, num_gpus: float) -> list[RayRank]:
    """Ranks 1..N-1 of `spec`, rank r in bundle r of the caller's placement group."""
    group = get_current_placement_group()
    if group is None:
        raise RuntimeError("Ray ranks need the replica's placement group (placement_group_"
                           "bundles on the deployment)")
    actor_class = ray.remote(_RankActor)
    ranks = []
    for rank in range(1, spec.world_size):
        actor: Any = actor_class.options(
            num_cpus=num_cpus, num_gpus=num_gpus, name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=rank)).remote()
        ranks.append(RayRank(rank, actor, actor.run.remote(rank, spec)))
    return ranks
