"""`levante pull | list | run | generate | serve`: models on disk, one-off answers, the server."""

# No `from __future__ import annotations`: typer reads the commands' annotations at every start,
# and evaluating them from strings cost 30-40 ms of each command (see levante.cli).

import json
import logging
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from levante.cli.typer_app import (
    Ref,
    app,
    console,
    fail,
    keep_until_exit,
    parse_size,
    sampling_params,
)
from levante.errors import ConfigError, LevanteError

if TYPE_CHECKING:  # torch loads only for the commands that run a model
    from levante.load_config import LoadConfig

TensorParallel = Annotated[int, typer.Option(
    "--tensor-parallel", "-tp",
    help="split every layer over N processes (num_heads and num_kv_heads must divide by N)")]
Device = Annotated[str, typer.Option(
    help="auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps; with --tensor-parallel: "
         "cpu (gloo) or cuda (NCCL, one GPU per rank)")]
Dtype = Annotated[str, typer.Option(
    help="auto (the checkpoint's own precision: bf16 weights stay bf16) | float32 | bfloat16 "
         "| float16")]
Quant = Annotated[str, typer.Option(
    help="auto (a GGUF computes with its own blocks on the CPU, safetensors stay float) | none "
         "(float; a GGUF is dequantized) | gguf | int8 | int4 (weight-only, at load) | fp8 (e4m3 "
         "at load: fp8 matmuls on Ada/Hopper, weight-only elsewhere; not MPS) | q8_0 | "
         "q6_k | q5_k_m | q4_k_m | q3_k_m (a float checkpoint to llama.cpp's GGUF types at load, "
         "CPU)")]
KVCacheDtype = Annotated[str, typer.Option(
    help="auto (the activations' dtype) | float32 | bfloat16 | float16 | q8_0 (8-bit with a "
         "scale per 32 values, as llama.cpp's; 53% of 16-bit)")]
Verbose = Annotated[bool, typer.Option(
    "--verbose", "-v", help="log to stderr what loads and which kernel computes each weight type")]


def _log_verbosely(verbose: bool) -> None:
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")


def _open_llm(ref: str, load_config: "LoadConfig", tensor_parallel: int
              ) -> AbstractContextManager[Any]:
    """An LLM in one process, or (N > 1) over N tensor-parallel ranks stopped on exit."""
    if tensor_parallel > 1:
        from levante.distributed.launch import tensor_parallel_llm

        return tensor_parallel_llm(ref, tensor_parallel=tensor_parallel, load_config=load_config)
    from levante.llm import LLM

    return nullcontext(keep_until_exit(LLM(ref, load_config=load_config)))


@app.command()
def pull(ref: Ref) -> None:
    """Download a model (the default `smollm2`, or a hub repo) into $LEVANTE_HOME."""
    from levante.weights.hub import pull as pull_model

    try:
        path = pull_model(ref)
    except LevanteError as e:
        fail(e)
    console.print(f"pulled {ref} -> {path}")


@app.command("list")
def list_models() -> None:
    """Show the models on disk with size and format."""
    from rich.table import Table

    from levante.weights.hub import list_models as list_all

    table = Table("name", "format", "size", "path")
    for info in list_all():
        table.add_row(info.name, info.format, f"{info.size_bytes / 1e6:,.1f} MB", str(info.path))
    console.print(table)


@app.command()
def generate(
    ref: Ref,
    prompt: Annotated[str, typer.Option(help="the prompt text")],
    chat: Annotated[bool, typer.Option(help="wrap the prompt as one user message")] = False,
    max_tokens: Annotated[int, typer.Option()] = 128,
    temperature: Annotated[float, typer.Option()] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    dtype: Dtype = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    json_schema: Annotated[Path | None, typer.Option(
        help="JSON schema file: the answer is JSON valid against it (implies --chat)")] = None,
    tensor_parallel: TensorParallel = 1,
    device: Device = "auto",
    quant: Quant = "auto",
    kv_cache_dtype: KVCacheDtype = "auto",
    verbose: Verbose = False,
) -> None:
    """Complete one prompt and print the text (or, with --json, ids, text and speeds)."""
    _log_verbosely(verbose)
    from levante.load_config import LoadConfig

    try:
        load_config = LoadConfig(device=device, dtype=dtype, quant=quant,
                                 kv_cache_dtype=kv_cache_dtype)
        params = sampling_params(max_tokens, temperature, top_p, top_k, seed, stop)
        response_format = _schema_format(json_schema) if json_schema else None
        with _open_llm(ref, load_config, tensor_parallel) as llm:
            if chat or response_format:
                result = llm.chat([{"role": "user", "content": prompt}], params,
                                  response_format=response_format)
            else:
                result = llm.generate(prompt, params)[0]
    except LevanteError as e:
        fail(e)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json()) + "\n")
    else:
        sys.stdout.write(result.text + "\n")  # as generated: not rewrapped to a width


@app.command()
def run(
    ref: Ref,
    prompt: Annotated[str | None, typer.Argument(help="one-shot prompt; omit to chat")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_tokens: Annotated[int, typer.Option()] = 512,
    temperature: Annotated[float, typer.Option()] = 0.15,
    seed: Annotated[int | None, typer.Option()] = None,
    dtype: Dtype = "auto",
    tensor_parallel: TensorParallel = 1,
    device: Device = "auto",
    quant: Quant = "auto",
    kv_cache_dtype: KVCacheDtype = "auto",
    verbose: Verbose = False,
) -> None:
    """Chat with a model: one answer for PROMPT, or an interactive multi-turn session."""
    _log_verbosely(verbose)
    from levante.load_config import LoadConfig

    try:
        load_config = LoadConfig(device=device, dtype=dtype, quant=quant,
                                 kv_cache_dtype=kv_cache_dtype)
        params = sampling_params(max_tokens, temperature, 1.0, None, seed, None)
        with _open_llm(ref, load_config, tensor_parallel) as llm:
            _chat_loop(llm, prompt, system, params)
    except LevanteError as e:
        fail(e)


def _chat_loop(llm: Any, prompt: str | None, system: str | None, params: Any) -> None:
    """One answer for `prompt`, or turns read from the terminal until /bye or EOF."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    turns = [prompt] if prompt is not None else None
    while True:
        text = turns.pop(0) if turns else (None if turns is not None else _ask())
        if text is None:
            return
        messages.append({"role": "user", "content": text})
        answer = _stream_answer(llm, messages, params)
        messages.append({"role": "assistant", "content": answer})
        if turns is not None and not turns:
            return


def _schema_format(path: Path) -> dict[str, Any]:
    """An OpenAI json_schema response_format from a schema file (errors name the file)."""

    try:
        schema = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read a JSON schema ({e})") from None
    return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema}}


def _lora_pairs(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """['sql=/a/b'] -> (('sql', '/a/b'),); a spec without '=' is an error naming it."""

    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora takes NAME=PATH, got {spec!r}")
        pairs.append((name, path))
    return tuple(pairs)


def _ask() -> str | None:
    try:
        text = console.input("[bold]>>> [/bold]")
    except (EOFError, KeyboardInterrupt):
        return None
    return None if text.strip() in ("/bye", "/exit") else text


def _stream_answer(llm: Any, messages: list[dict[str, Any]], params: Any) -> str:
    parts = []
    for out in llm.stream(llm.encode_chat(messages), params):
        sys.stdout.write(out.new_text)
        sys.stdout.flush()
        parts.append(out.new_text)
    sys.stdout.write("\n")
    return "".join(parts)


@app.command()
def serve(
    ref: Ref,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="LEVANTE_API_KEY")] = None,
    allowed_hosts: Annotated[list[str] | None, typer.Option(
        metavar="NAME[,NAME...]",
        help="Host header names accepted besides localhost, 127.x.x.x and ::1 when bound to "
             "loopback (e.g. a reverse proxy's name; repeatable)")] = None,
    max_model_len: Annotated[int | None, typer.Option()] = None,
    max_num_seqs: Annotated[int, typer.Option()] = 16,
    max_num_batched_tokens: Annotated[int, typer.Option()] = 512,
    max_queue: Annotated[int, typer.Option()] = 256,
    kv_cache_memory: Annotated[str | None, typer.Option(help="e.g. 2GB")] = None,
    kv_cache_dtype: KVCacheDtype = "auto",
    dtype: Dtype = "auto",
    served_model_name: Annotated[str | None, typer.Option()] = None,
    no_web: Annotated[bool, typer.Option(
        "--no-web", help="Do not serve the browser chat page at /")] = False,
    allow_local_paths: Annotated[bool, typer.Option(
        "--allow-local-paths",
        help="let /api/pull name files and folders on this machine (off: registry names and "
             "Hugging Face repos only)")] = False,
    embedding_pooling: Annotated[str | None, typer.Option(
        metavar="mean|cls|last",
        help="how /v1/embeddings and /api/embed pool the final hidden states (default: the "
             "GGUF's pooling_type, else mean, as llama.cpp --embeddings; last: what Ollama "
             "0.12 returns for a model without a pooling type)")] = None,
    prefix_caching: Annotated[bool, typer.Option(
        help="reuse KV blocks of repeated prompt prefixes")] = True,
    num_speculative_tokens: Annotated[int, typer.Option(
        help="prompt-lookup draft tokens per step for greedy requests (0 = off)")] = 0,
    lora: Annotated[list[str] | None, typer.Option(
        help="NAME=PATH: serve a PEFT adapter under model name NAME (repeatable)")] = None,
    batch_invariant: Annotated[bool, typer.Option(
        help="a request's tokens never depend on its batch (always so on the CPU; on a GPU "
             "each sequence then runs alone)")] = False,
    drain_timeout: Annotated[float, typer.Option(
        help="seconds requests in flight get to finish after SIGTERM/SIGINT (new ones get "
             "503); then they end with an error")] = 30.0,
    header_timeout: Annotated[float, typer.Option(
        help="seconds a client may take to send a request's headers")] = 10.0,
    body_timeout: Annotated[float, typer.Option(
        help="seconds a client may take to send a request's body")] = 60.0,
    max_connections: Annotated[int, typer.Option(
        help="open connections served; past it a request gets a 503")] = 1024,
    max_stored_responses: Annotated[int, typer.Option(
        help="Responses API responses kept in memory for previous_response_id and GET "
             "(also at most 64 MB of them; least recently used go first; 0: none)")] = 1024,
    tensor_parallel: TensorParallel = 1,
    device: Device = "auto",
    quant: Quant = "auto",
    replicas: Annotated[int, typer.Option(
        help="engine processes behind one load-routing front (0: front over --upstream only)"
    )] = 1,
    upstream: Annotated[list[str] | None, typer.Option(
        help="base URL of another Levante server for the front to route to (repeatable)")
    ] = None,
    prefix_routing: Annotated[bool, typer.Option(
        help="send a conversation to the same replica each turn (within a load bound)")] = True,
    ray: Annotated[bool, typer.Option(
        "--ray", help="run the engines as Ray Serve replicas, on the cluster at RAY_ADDRESS "
                      "(else a local one), served from this process; scale with --replicas "
                      "or --min/--max-replicas")] = False,
    min_replicas: Annotated[int | None, typer.Option(
        help="with --ray: autoscaling floor (default: --replicas)")] = None,
    max_replicas: Annotated[int | None, typer.Option(
        help="with --ray: autoscaling ceiling (default: --replicas)")] = None,
    target_ongoing_requests: Annotated[float, typer.Option(
        help="with --ray: requests in flight per replica the autoscaler aims at")] = 8.0,
    ray_router: Annotated[str, typer.Option(
        metavar="conversation|prefix-tree|pow2",
        help="with --ray: Ray Serve's request router: a conversation's replica (rendezvous "
             "hash, load-bounded), Ray's prefix-tree router, or power of two choices")
    ] = "conversation",
    ray_proxy: Annotated[bool, typer.Option(
        "--ray-proxy", help="with --ray: serve HTTP through Ray Serve's proxy (every node with "
                            "a replica) and an ingress deployment, not from this process "
                            "(two more hops a request)")] = False,
    ray_cpus: Annotated[float, typer.Option(
        help="with --ray: CPUs each rank reserves")] = 1.0,
    ray_gpus: Annotated[float | None, typer.Option(
        help="with --ray: GPUs each rank reserves (default: 1 with --device cuda, else 0; "
             "0.5 puts two replicas on one GPU: give each a --kv-cache-memory)")] = None,
) -> None:
    """Serve a model with OpenAI's and Ollama's APIs, a chat page at /, /health and /metrics.

    --tensor-parallel N splits each layer over N processes; --replicas N runs N engines
    behind a front on HOST:PORT that routes by load (its /metrics counts per replica);
    --ray runs them as Ray Serve replicas instead (autoscaled, on one machine or a cluster).
    """
    from levante.server.app import serve as run_server
    from levante.server.config import ServerConfig

    try:
        config = ServerConfig(
            ref=ref, host=host, port=port, api_key=api_key, max_model_len=max_model_len,
            allowed_hosts=tuple(n for names in allowed_hosts or [] for n in names.split(",")
                                if n.strip()),
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_queue=max_queue, kv_cache_memory=parse_size(kv_cache_memory),
            kv_cache_dtype=kv_cache_dtype, device=device,
            dtype=dtype, quant=quant, served_model_name=served_model_name, no_web=no_web,
            allow_local_paths=allow_local_paths, embedding_pooling=embedding_pooling,
            enable_prefix_caching=prefix_caching, num_speculative_tokens=num_speculative_tokens,
            batch_invariant=batch_invariant, lora=_lora_pairs(lora or []),
            drain_timeout=drain_timeout, header_timeout=header_timeout,
            body_timeout=body_timeout, max_connections=max_connections,
            max_stored_responses=max_stored_responses)
        if ray:
            from levante.distributed.ray_serve import RayServeConfig, serve_ray

            if upstream:
                raise ConfigError("--upstream is for the built-in front; with --ray, join the "
                                  "other machines to the Ray cluster instead")
            serve_ray(config, RayServeConfig(
                min_replicas=replicas if min_replicas is None else min_replicas,
                max_replicas=replicas if max_replicas is None else max_replicas,
                target_ongoing_requests=target_ongoing_requests,
                tensor_parallel=tensor_parallel, num_cpus=ray_cpus,
                num_gpus=ray_gpus if ray_gpus is not None
                else 1.0 if device.startswith("cuda") else 0.0,
                router=ray_router if prefix_routing else "pow2"), through_ray_proxy=ray_proxy)
        elif replicas != 1 or upstream:
            from levante.distributed.replicas import serve_replicas

            per_replica = ["--device", device, "--quant", quant,
                           "--tensor-parallel", str(tensor_parallel)]
            serve_replicas(config, num_replicas=replicas, upstreams=upstream,
                           prefix_aware=prefix_routing, extra_args=per_replica)
        elif tensor_parallel > 1:
            from levante.distributed.launch import serve_tensor_parallel

            serve_tensor_parallel(config, tensor_parallel=tensor_parallel)
        else:
            run_server(config)
    except LevanteError as e:
        fail(e)
