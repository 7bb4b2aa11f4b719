"""Fuzzing GGUF files with hypothesis: a tiny but complete llama GGUF (written by gguf-py's
GGUFWriter, with a byte-level BPE vocab and a chat template) has its header fields, counts,
string lengths, value types, tensor dims, types and offsets overwritten. Opening it must give a
GGUFFile or a ModelFileError; loading it whole must give a Bundle or one of our errors, each
within a time bound, the load in a worker process under a memory limit.

The suite runs a bounded number of examples; `make fuzz` raises LEVANTE_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import json
import os
import resource
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from levante.errors import ModelFileError
from levante.weights.gguf import GGUFFile

MAX_EXAMPLES = int(os.environ.get("LEVANTE_FUZZ_EXAMPLES", "200"))
# The suite replays the same examples each run; `make fuzz` explores new ones.
IS_RANDOM = os.environ.get("LEVANTE_FUZZ_RANDOM") == "1"
OPEN_SECONDS = 2.0  # per file: header parse and every tensor's bytes
LOAD_SECONDS = 20.0  # per file: config, weights, tokenizer, chat template, model
WORKER_MEMORY = 3 * 2**30  # address space of the loading worker (torch alone maps ~1.3 GiB)
VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType
VALUE_WIDTHS = {VT.UINT8: 1, VT.INT8: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4,
                VT.FLOAT32: 4, VT.BOOL: 1, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}

# 60 printable one-byte tokens ("!" to "\\"), one merge ("A B" -> "AB"), three control tokens.
TOKENS = [chr(c) for c in range(33, 93)] + ["AB", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class Field:
    """One little-endian integer field of the file: where, how wide, what it means."""

    position: int
    width: int  # bytes: 4 or 8 (or a scalar value's width)
    kind: str  # count | length | type | dims | dim | offset | scalar | version


def tiny_metadata() -> dict[str, tuple[object, VT]]:
    """The tiny model's metadata, key -> (value, GGUF type); gguf-py adds the architecture."""
    return {
        "llama.context_length": (64, VT.UINT32), "llama.embedding_length": (32, VT.UINT32),
        "llama.block_count": (2, VT.UINT32), "llama.feed_forward_length": (48, VT.UINT32),
        "llama.attention.head_count": (4, VT.UINT32),
        "llama.attention.head_count_kv": (2, VT.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32),
        "llama.rope.freq_base": (10000.0, VT.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", VT.STRING), "tokenizer.ggml.pre": ("gpt2", VT.STRING),
        "tokenizer.ggml.tokens": (TOKENS, VT.ARRAY),
        "tokenizer.ggml.token_type": ([1] * 61 + [3] * 3, VT.ARRAY),
        "tokenizer.ggml.merges": (["A B"], VT.ARRAY),
        "tokenizer.ggml.bos_token_id": (62, VT.UINT32),
        "tokenizer.ggml.eos_token_id": (63, VT.UINT32),
        "tokenizer.chat_template": (CHATML, VT.STRING),
    }


def tiny_tensors() -> dict[str, np.ndarray]:
    """A 2-layer llama (vocab 64, dim 32, 4 heads, 2 KV heads of 8, FFN 48), tied output."""
    vocab, dim, ffn, q_rows, kv_rows = len(TOKENS), 32, 48, 4 * 8, 2 * 8
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    for i in range(2):
        shapes |= {f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.ffn_norm.weight": (dim,),
                   f"blk.{i}.attn_q.weight": (q_rows, dim), f"blk.{i}.attn_k.weight": (kv_rows, dim),
                   f"blk.{i}.attn_v.weight": (kv_rows, dim),
                   f"blk.{i}.attn_output.weight": (dim, q_rows),
                   f"blk.{i}.ffn_gate.weight": (ffn, dim), f"blk.{i}.ffn_up.weight": (ffn, dim),
                   f"blk.{i}.ffn_down.weight": (dim, ffn)}
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.1
            for name, shape in shapes.items()}


def write_model(path: Path, metadata: dict[str, tuple[object, VT]],
                tensors: dict[str, np.ndarray]) -> Path:
    """A GGUF by gguf-py's writer: Q8_0 embeddings, F16 matrices, F32 vectors."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, (value, value_type) in metadata.items():
        if value_type == VT.ARRAY:
            writer.add_array(key, value)  # type: ignore[arg-type]
        else:
            writer.add_key_value(key, value, value_type)
    for name, array in tensors.items():
        if name == "token_embd.weight":
            writer.add_tensor(name, gguf.quants.quantize(array, QT.Q8_0), raw_dtype=QT.Q8_0)
        else:
            writer.add_tensor(name, array.astype(np.float16) if array.ndim == 2 else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_model(path: Path) -> Path:
    """The file every fuzz case starts from."""
    return write_model(path, tiny_metadata(), tiny_tensors())


def header_fields(data: bytes) -> list[Field]:
    """Every integer field of a valid GGUF's header (our own file, so trusted here)."""
    fields = [Field(4, 4, "version"), Field(8, 8, "count"), Field(16, 8, "count")]
    num_tensors, num_kvs = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(pos: int) -> int:
        fields.append(Field(pos, 8, "length"))
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]

    def value(pos: int, value_type: int) -> int:
        if value_type == VT.STRING:
            return string(pos)
        if value_type == VT.ARRAY:
            item_type, count = struct.unpack_from("<IQ", data, pos)
            fields.extend([Field(pos, 4, "type"), Field(pos + 4, 8, "count")])
            pos += 12
            for _ in range(count):
                pos = value(pos, item_type)
            return pos
        fields.append(Field(pos, VALUE_WIDTHS[value_type], "scalar"))
        return pos + VALUE_WIDTHS[value_type]

    for _ in range(num_kvs):
        pos = string(pos)
        fields.append(Field(pos, 4, "type"))
        pos = value(pos + 4, struct.unpack_from("<I", data, pos)[0])
    for _ in range(num_tensors):
        pos = string(pos)
        (num_dims,) = struct.unpack_from("<I", data, pos)
        fields.append(Field(pos, 4, "dims"))
        fields.extend(Field(pos + 4 + 8 * i, 8, "dim") for i in range(num_dims))
        pos += 4 + 8 * num_dims
        fields.extend([Field(pos, 4, "type"), Field(pos + 4, 8, "offset")])
        pos += 12
    return fields


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[Field]]:
    data = write_tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny.gguf").read_bytes()
    return data, header_fields(data)


def interesting(width: int, file_size: int) -> st.SearchStrategy[int]:
    """Values that break parsers: 0, 1, sign bits, all ones, around the file size."""
    top = 2 ** (8 * width) - 1
    edges = [0, 1, 2, 3, 4, 5, 31, 32, 33, 255, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1,
             file_size - 1, file_size, file_size + 1, top // 2, top]
    return st.one_of(st.sampled_from([e for e in edges if 0 <= e <= top]),
                     st.integers(0, top))


@st.composite
def mutations(draw: st.DrawFn, data: bytes, fields: list[Field]) -> bytes:
    """1 to 3 header fields overwritten, sometimes random bytes or a cut as well."""
    out = bytearray(data)
    by_kind: dict[str, list[Field]] = {}
    for f in fields:  # each kind equally likely: there are far more string lengths than dims
        by_kind.setdefault(f.kind, []).append(f)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(by_kind[draw(st.sampled_from(sorted(by_kind)))]))
        value = draw(interesting(field.width, len(data)))
        out[field.position:field.position + field.width] = value.to_bytes(field.width, "little")
    if draw(st.booleans()):
        position = draw(st.integers(0, len(data) - 1))
        out[position:position + 8] = draw(st.binary(min_size=1, max_size=8))
    if draw(st.integers(0, 9)) == 0:
        out = out[:draw(st.integers(0, len(out)))]
    return bytes(out)


def test_the_tiny_model_loads_and_every_field_is_found(tiny_model, tmp_path: Path) -> None:
    """The fuzz starts from a file we read fully (else it only tests the first error)."""
    from levante.bundle import load

    data, fields = tiny_model
    path = tmp_path / "tiny.gguf"
    path.write_bytes(data)
    bundle = load(str(path))
    assert bundle.config.num_layers == 2 and bundle.config.vocab_size == len(TOKENS)
    assert bundle.tokenizer.encode("AB!") == [TOKENS.index("AB"), 0]
    assert bundle.chat_format is not None
    assert sum(f.kind == "offset" for f in fields) == len(GGUFFile(path).tensor_names) == 20
    assert sum(f.kind == "length" for f in fields) > len(TOKENS)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_mutated_headers_open_or_raise_model_file_error(tiny_model, tmp_path: Path) -> None:
    data, fields = tiny_model
    path = tmp_path / "mutated.gguf"
    start_peak = peak_rss()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=not IS_RANDOM,
              suppress_health_check=list(HealthCheck))
    @given(mutations(data, fields))
    def run(mutated: bytes) -> None:
        path.write_bytes(mutated)
        start = time.monotonic()
        try:
            gguf_file = GGUFFile(path)
            for name in gguf_file.tensor_names:
                gguf_file.load(name)
        except ModelFileError as e:
            assert str(path) in str(e)
        assert time.monotonic() - start < OPEN_SECONDS

    run()
    assert peak_rss() - start_peak < 256 * 2**20


WORKER = """
import json, resource, sys, time, traceback
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from levante.bundle import load
from levante.errors import LevanteError
for line in sys.stdin:
    start = time.monotonic()
    try:
        load(line.strip())
        outcome = "ok"
    except LevanteError as e:
        outcome = "ours: " + type(e).__name__
    except BaseException as e:
        outcome = "UNEXPECTED " + "".join(traceback.format_exception_only(e)).strip()[:300]
    print(json.dumps([outcome, time.monotonic() - start]), flush=True)
"""


class LoadWorker:
    """A process that loads model files under an address-space limit, one per line."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER.format(limit=WORKER_MEMORY)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def load(self, path: Path) -> tuple[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], LOAD_SECONDS)
        if not ready:
            self.close()
            raise AssertionError(f"loading took over {LOAD_SECONDS} s")
        line = self.proc.stdout.readline()
        assert line, f"the loading worker died (exit {self.proc.wait()})"
        outcome, seconds = json.loads(line)
        return outcome, seconds

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def worker() -> Iterator[list[LoadWorker]]:
    """One loading process for the module (in a list: a test replaces it if it dies)."""
    workers = [LoadWorker()]
    yield workers
    workers[0].close()


def load_in_worker(workers: list[LoadWorker], path: Path) -> None:
    """Load `path` whole; it must succeed or raise one of our errors, in bounded time."""
    if workers[0].proc.poll() is not None:
        workers[0] = LoadWorker()
    outcome, seconds = workers[0].load(path)
    assert not outcome.startswith("UNEXPECTED"), outcome
    assert seconds < LOAD_SECONDS


def test_mutated_models_load_or_raise_our_errors(tiny_model, worker, tmp_path: Path) -> None:
    """The whole load (config, weights, tokenizer, chat template) of damaged files."""
    data, fields = tiny_model
    metadata_fields = [f for f in fields if f.kind in ("scalar", "type", "count", "length")]
    path = tmp_path / "mutated.gguf"

    @settings(max_examples=max(MAX_EXAMPLES // 4, 1), deadline=None, database=None,
              derandomize=not IS_RANDOM, suppress_health_check=list(HealthCheck))
    @given(mutations(data, metadata_fields))
    def run(mutated: bytes) -> None:
        path.write_bytes(mutated)
        load_in_worker(worker, path)

    run()


TEMPLATE_TRAPS = ["{% for i in range(10**9) %}x{% endfor %}", "{{ ''.__class__.__mro__ }}",
                  "{{ messages[99]['content'] }}", "{% include 'x.html' %}", "{{ 'a' * 10**9 }}",
                  "{% raise %}", "{{ raise_exception('no') }}", "{%", "{{ cycler.__init__ }}"]
ODD_INTS = [0, 1, 3, 5, 63, 64, 65, 2**16, 2**31 - 1, 2**32 - 1, 2**40]
VALUES = st.one_of(
    st.tuples(st.sampled_from(ODD_INTS), st.just(VT.UINT64)),
    st.tuples(st.sampled_from([-1, -(2**31), 2**31 - 1]), st.just(VT.INT32)),
    st.tuples(st.sampled_from([0.0, -1.0, 1e30, float("nan"), float("inf")]), st.just(VT.FLOAT32)),
    st.tuples(st.booleans(), st.just(VT.BOOL)),
    st.tuples(st.one_of(st.sampled_from(TEMPLATE_TRAPS + ["", "gpt2", "llama", "A B"]),
                        st.text(max_size=20)), st.just(VT.STRING)),
    st.tuples(st.lists(st.sampled_from(ODD_INTS[:6] + [-1]), max_size=70), st.just(VT.ARRAY)),
    st.tuples(st.lists(st.sampled_from(TOKENS + ["", "A B", "A B C", "ZZ", "\x00"]),
                       min_size=1, max_size=70), st.just(VT.ARRAY)),
    st.tuples(st.lists(st.floats(allow_nan=True, width=32), min_size=1, max_size=5),
              st.just(VT.ARRAY)),
)


@st.composite
def odd_metadata(draw: st.DrawFn) -> dict[str, tuple[object, VT]]:
    """The tiny model's metadata with 1 to 3 keys dropped or given odd values of any type."""
    metadata = tiny_metadata()
    keys = sorted(metadata) + ["general.alignment", "llama.attention.key_length",
                               "llama.vocab_size", "tokenizer.ggml.add_bos_token"]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 4)) == 0:
            metadata.pop(key, None)
        else:
            metadata[key] = draw(VALUES)
    return metadata


def test_odd_metadata_values_load_or_raise_our_errors(worker, tmp_path: Path) -> None:
    """Well-formed files whose config, tokenizer and template fields hold nonsense."""
    tensors = tiny_tensors()
    path = tmp_path / "odd.gguf"

    @settings(max_examples=max(MAX_EXAMPLES // 2, 1), deadline=None, database=None,
              derandomize=not IS_RANDOM, suppress_health_check=list(HealthCheck))
    @given(odd_metadata())
    def run(metadata: dict[str, tuple[object, VT]]) -> None:
        write_model(path, metadata, tensors)
        load_in_worker(worker, path)

    run()
