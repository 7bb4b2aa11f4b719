"""Ray Serve's request-router hook for Levante engines: a conversation goes to the same replica.

Ray Serve routes a handle call through a `RequestRouter`; this one gives a request with a
routing key (the ingress puts the conversation's first messages, or the prompt's start, in
`ProxiedRequest.routing_key`) the replica that key hashes to, so its prefix-cached KV blocks
are reused turn after turn, unless that replica's queue is `max_imbalance` longer than the
shortest one known; then, and for requests without a key, power of two choices by queue
length, Ray's default. Rendezvous hashing: a key's replica survives other replicas leaving,
and when its own replica dies the key moves to the next-ranked one.

Ray's own `ray.serve.llm.request_router.PrefixCacheAffinityRouter` (a prefix tree of prompt
text in a separate actor) reads the same requests (`ProxiedRequest.messages` / `.prompt`):
`levante serve --ray --ray-router prefix-tree` picks it.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)


def routing_key_of(pending_request: PendingRequest | None) -> bytes | None:
    """The routing key of a handle call's first argument, if it carries one."""
    if pending_request is None or not pending_request.args:
        return None
    return getattr(pending_request.args[0], "routing_key", None)


def rendezvous_rank(key: bytes, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """`replicas` by the highest-random-weight hash of (key, replica id): the first is home."""
    def weight(replica: RunningReplica) -> bytes:
        name = replica.replica_id.unique_id.encode()
        return hashlib.blake2b(key + name, digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


class ConversationAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Rendezvous-hash affinity on the routing key within a queue-length bound, else power of
    two choices (see the module docstring)."""

    def initialize_state(self, max_imbalance: int = 2, **_: Any) -> None:
        """`max_imbalance`: how many more queued requests home may have than the shortest."""
        self.max_imbalance = max_imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        """Ranks of replicas to try, best first: [[home], [others by queue length]]."""
        if not candidate_replicas:
            return []
        key = routing_key_of(pending_request)
        if key is None:
            return [self._two_choices(candidate_replicas)]
        ranked = rendezvous_rank(key, candidate_replicas)
        home, others = ranked[0], sorted(ranked[1:], key=self._queue_len)
        if others and self._queue_len(home) > self._queue_len(others[0]) + self.max_imbalance:
            return [others[:2], [home]]
        return [[home], others] if others else [[home]]

    def _queue_len(self, replica: RunningReplica) -> int:
        """The last queue length Ray's probes saw for `replica` (0 when unknown or stale)."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def _two_choices(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """Two random replicas (Ray probes both and takes the shorter queue)."""
        return random.sample(replicas, min(2, len(replicas)))
