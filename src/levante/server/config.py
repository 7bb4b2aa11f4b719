"""How `levante serve` runs: the model, the engine limits and the HTTP guards, checked when made."""

from __future__ import annotations

from dataclasses import dataclass, field

from levante.errors import ConfigError
from levante.load_config import LoadConfig
from levante.server.hosts import split_host


@dataclass(frozen=True)
class ServerConfig:
    """How `levante serve` runs: the model, the engine limits and the HTTP guards."""

    ref: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # never in a logged repr
    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_queue: int = 256
    kv_cache_memory: int | None = None
    num_kv_blocks: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    quant: str = "auto"
    kv_cache_dtype: str = "auto"
    served_model_name: str | None = None
    enable_prefix_caching: bool = True
    lora: tuple[tuple[str, str], ...] = ()  # (served name, adapter folder)
    num_speculative_tokens: int = 0
    batch_invariant: bool = False
    max_body_bytes: int = 8 * 2**20
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback ones
    no_web: bool = False
    drain_timeout: float = 30.0  # seconds accepted requests get to finish after SIGTERM
    header_timeout: float = 10.0  # seconds a request's headers may take to arrive
    body_timeout: float = 60.0  # seconds its body may take after the headers
    max_connections: int = 1024  # open connections; past it a request gets a 503
    allow_local_paths: bool = False  # /api/pull may name files on the server's disk
    # Responses API responses kept in memory for previous_response_id (least recent go first)
    max_stored_responses: int = 1024
    max_stored_response_bytes: int = 64 * 2**20
    # mean | cls | last; None: the GGUF's `<arch>.pooling_type`, else mean (see embeddings)
    embedding_pooling: str | None = None
    # How the model loads, built from the fields above (and checked) when the config is made.
    load_config: LoadConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "load_config", LoadConfig(
            device=self.device, dtype=self.dtype, quant=self.quant,
            kv_cache_dtype=self.kv_cache_dtype, max_model_len=self.max_model_len,
            kv_cache_memory=self.kv_cache_memory))
        names = []
        for given in self.allowed_hosts:
            split = split_host(given)
            if split is None or split[1] is not None:
                raise ConfigError(f"allowed_hosts: {given!r} is not a host name or IP "
                                  "(give names without a port, e.g. myhost.example)")
            names.append(split[0])
        object.__setattr__(self, "allowed_hosts", tuple(names))
        if self.embedding_pooling not in (None, "mean", "cls", "last"):
            raise ConfigError(f"embedding_pooling must be mean, cls or last, got "
                              f"{self.embedding_pooling!r}")
        for name in ("drain_timeout", "header_timeout", "body_timeout", "max_connections"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_stored_responses", "max_stored_response_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: store none), got "
                                  f"{getattr(self, name)}")
