"""GGUF files: metadata and tensors as gguf-py reads them, weights as transformers loads them,
and a clear ModelFileError for every kind of broken file."""

from __future__ import annotations

import shutil
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from levante.bundle import load
from levante.config import PRESETS, ModelConfig
from levante.errors import ModelFileError
from levante.weights.gguf import GGUFFile, check_fits_config, load_gguf_state_dict
from levante.weights.layout import half_to_interleaved

QT = gguf.GGMLQuantizationType
TINY = ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   ffn_dim=48, tie_embeddings=False)


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> GGUFFile:
    return GGUFFile(smollm2_gguf)


@pytest.fixture(scope="module")
def reader(smollm2_gguf: Path) -> gguf.GGUFReader:
    """gguf-py's own reader (~2 s), the reference for what the file says."""
    return gguf.GGUFReader(smollm2_gguf, "r")


@pytest.fixture(scope="module")
def smol_state(smol: GGUFFile) -> dict[str, torch.Tensor]:
    return load_gguf_state_dict(smol, PRESETS["smollm2"], torch.float32)


def tiny_gguf_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under GGUF names (torch-order shapes), q/k in GGUF layout."""
    gen = torch.Generator().manual_seed(seed)
    dim, ffn = config.dim, config.ffn_dim
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = {"attn_norm": (dim,), "attn_q": (q_rows, dim), "attn_k": (kv_rows, dim),
                 "attn_v": (kv_rows, dim), "attn_output": (dim, q_rows), "ffn_norm": (dim,),
                 "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim), "ffn_down": (dim, ffn)}
    shapes = {"token_embd.weight": (config.vocab_size, dim), "output_norm.weight": (dim,),
              "output.weight": (config.vocab_size, dim)}
    for i in range(config.num_layers):
        shapes |= {f"blk.{i}.{part}.weight": shape for part, shape in per_layer.items()}
    return {name: torch.randn(shape, generator=gen).numpy() for name, shape in shapes.items()}


def write_gguf(path: Path, tensors: dict[str, np.ndarray], *,
               raw_dtypes: dict[str, QT] | None = None, model_metadata: bool = False) -> Path:
    """A small llama GGUF with gguf-py's writer (arrays are torch order, as gguf-py's).

    model_metadata: also TINY's dimensions, so `ModelConfig.from_gguf` reads TINY back.
    """
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(TINY.num_layers)
    if model_metadata:
        writer.add_context_length(TINY.max_seq_len)
        writer.add_embedding_length(TINY.dim)
        writer.add_feed_forward_length(TINY.ffn_dim)
        writer.add_head_count(TINY.num_heads)
        writer.add_head_count_kv(TINY.num_kv_heads)
        writer.add_key_length(TINY.head_dim)
        writer.add_rope_dimension_count(TINY.head_dim)
        writer.add_vocab_size(TINY.vocab_size)
    writer.add_array("test.numbers", [1, 2, 3])
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=(raw_dtypes or {}).get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def patch(path: Path, position: int, fmt: str, value: int | bytes) -> None:
    """Overwrite one little-endian field of the file in place."""
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, position, value)
    path.write_bytes(bytes(data))


def tensor_info_position(path: Path, name: str, num_dims: int) -> dict[str, int]:
    """Byte positions of a tensor-info record's dims, type and offset fields."""
    start = path.read_bytes().rindex(name.encode()) + len(name)
    return {"dims": start + 4, "type": start + 4 + 8 * num_dims,
            "offset": start + 8 + 8 * num_dims}


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    """Two F32 tensors: a [4, 8] and a [16]."""
    return write_gguf(tmp_path / "small.gguf", {"a.weight": np.ones((4, 8), np.float32),
                                                "b.weight": np.arange(16, dtype=np.float32)})


def assert_file_error(path: Path, *fragments: str) -> ModelFileError:
    with pytest.raises(ModelFileError) as caught:
        GGUFFile(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


# --- the real SmolLM2 file ---------------------------------------------------------------

def test_smollm2_metadata(smol: GGUFFile) -> None:
    assert smol.architecture == "llama" and smol.version == 3
    meta = smol.metadata
    assert meta["llama.block_count"] == 30
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert meta["llama.attention.layer_norm_rms_epsilon"] == 1e-5  # float32 shown shortest
    assert all(type(v) in (str, int, float, bool, list) for v in meta.values())


def test_metadata_equals_gguf_reader(smol: GGUFFile, reader: gguf.GGUFReader) -> None:
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert smol.metadata.keys() == expected.keys()
    for key, value in expected.items():
        if reader.fields[key].types == [gguf.GGUFValueType.FLOAT32]:
            assert np.float32(smol.metadata[key]) == np.float32(value), key
        else:
            assert smol.metadata[key] == value, key


def test_tensors_equal_gguf_reader(smol: GGUFFile, reader: gguf.GGUFReader) -> None:
    assert smol.tensor_names == [t.name for t in reader.tensors]
    for t in reader.tensors:
        assert smol.tensor_type(t.name) == t.tensor_type
        assert smol.tensor_shape(t.name) == tuple(reversed(t.shape.tolist()))
        assert smol.nbytes(t.name) == t.n_bytes
        assert np.array_equal(smol.raw(t.name).numpy(), t.data.reshape(-1).view(np.uint8))


def test_opening_is_fast(smollm2_gguf: Path) -> None:
    start = time.perf_counter()
    GGUFFile(smollm2_gguf)
    assert time.perf_counter() - start < 1.0  # ~0.03 s here; gguf.GGUFReader takes ~2 s


def _mapping_rss_kib(address: int) -> int:
    """Resident KiB of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if line[:1].isalnum() and "-" in first and ":" not in first:  # a mapping's header
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps")
def test_dequantizing_leaves_no_file_pages_resident(smollm2_gguf: Path) -> None:
    """`load` copies a tensor out of the map and drops its pages from the process (they stay
    in the page cache): dequantizing a whole file holds its weights, not the file too."""
    gguf_file = GGUFFile(smollm2_gguf)  # its own map (the suite's other loads have theirs)
    address = gguf_file.raw(gguf_file.tensor_names[0]).data_ptr()
    raw_kib = sum(gguf_file.nbytes(n) for n in gguf_file.tensor_names) // 1024
    assert sum(int(gguf_file.raw(n)[::4096].sum()) for n in gguf_file.tensor_names) > 0
    assert _mapping_rss_kib(address) > raw_kib * 0.9  # touched: resident
    for name in gguf_file.tensor_names:
        assert gguf_file.load(name).isfinite().all()
    header_kib = smollm2_gguf.stat().st_size // 1024 - raw_kib  # metadata: the vocab, ~2 MB
    fault_around_kib = 64 * len(gguf_file.tensor_names)  # the kernel maps 64 KiB per fault
    assert _mapping_rss_kib(address) <= header_kib + fault_around_kib


def test_config_from_metadata_equals_preset(smol: GGUFFile) -> None:
    has_output = "output.weight" in smol.tensor_names
    assert ModelConfig.from_gguf(smol.metadata, has_output_tensor=has_output) == PRESETS["smollm2"]
    check_fits_config(smol, PRESETS["smollm2"])  # every tensor known, none refused


def test_state_dict_names_and_shapes(smol_state: dict[str, torch.Tensor]) -> None:
    assert len(smol_state) == 2 + 30 * 9 and "lm_head.weight" not in smol_state  # tied
    assert smol_state["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert smol_state["model.embed_tokens.weight"].shape == (49152, 576)


def test_q_k_equal_transformers_processing(reader: gguf.GGUFReader,
                                           smol_state: dict[str, torch.Tensor]) -> None:
    """Our q/k un-permutation equals what transformers' GGUF loader applies (its processor)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": 9,
                                                   "num_key_value_heads": 3})
    tensors = {t.name: t for t in reader.tensors}
    for layer in (0, 17):
        for gguf_part, hf_part in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            name = f"blk.{layer}.{gguf_part}.weight"
            weights = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
            expected = processor.process(weights=weights, name=name).weights
            ours = smol_state[f"model.layers.{layer}.self_attn.{hf_part}.weight"]
            assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(expected)))


@pytest.mark.slow
def test_weights_equal_transformers_gguf_loader(smollm2_gguf: Path,
                                                smol_state: dict[str, torch.Tensor]) -> None:
    """The full reference: transformers' GGUF loader (~26 s, needs accelerate)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    reference = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.0.self_attn.v_proj.weight", "model.embed_tokens.weight"):
        assert torch.equal(smol_state[name], reference[name]), name


# --- round trip through gguf-py's writer -------------------------------------------------

def test_state_dict_round_trip(tmp_path: Path) -> None:
    tensors = tiny_gguf_tensors(TINY)
    state = load_gguf_state_dict(GGUFFile(write_gguf(tmp_path / "t.gguf", tensors)), TINY,
                                 torch.float32)
    q = state["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(half_to_interleaved(q, TINY.num_heads),
                       torch.from_numpy(tensors["blk.1.attn_q.weight"]))
    k = state["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(half_to_interleaved(k, TINY.num_kv_heads),
                       torch.from_numpy(tensors["blk.0.attn_k.weight"]))
    assert torch.equal(state["lm_head.weight"], torch.from_numpy(tensors["output.weight"]))
    bf16 = load_gguf_state_dict(GGUFFile(tmp_path / "t.gguf"), TINY, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert torch.equal(bf16["model.layers.1.self_attn.q_proj.weight"], q.bfloat16())


@pytest.mark.parametrize(("extra", "why"), [
    ("rope_freqs.weight", "per-frequency RoPE factors"),
    ("blk.0.attn_q.bias", "is a bias"),
    ("blk.1.ffn_down.bias", "is a bias"),
    ("vision.patch_embd.weight", "not one Levante knows"),
])
def test_extra_tensor_refused_naming_file_and_tensor(tmp_path: Path, extra: str,
                                                     why: str) -> None:
    """A tensor the model has no place for is refused, not dropped: the file computes with it."""
    tensors = tiny_gguf_tensors(TINY) | {extra: np.ones(TINY.dim, np.float32)}
    path = write_gguf(tmp_path / "t.gguf", tensors)
    with pytest.raises(ModelFileError) as caught:
        load_gguf_state_dict(GGUFFile(path), TINY, torch.float32)
    message = str(caught.value)
    assert str(path) in message and f"tensor {extra} " in message and why in message, message


@pytest.mark.parametrize("quant", ["auto", "gguf", "none"])
def test_extra_tensor_refused_by_every_load_path(tmp_path: Path, quant: str) -> None:
    """The block-kernel path (the default on CPU) refuses it too, before any weight is read."""
    tensors = tiny_gguf_tensors(TINY) | {"blk.1.attn_k.bias": np.ones(16, np.float32)}
    path = write_gguf(tmp_path / "t.gguf", tensors, model_metadata=True)
    assert ModelConfig.from_gguf(GGUFFile(path).metadata, has_output_tensor=True) == TINY
    with pytest.raises(ModelFileError) as caught:
        load(str(path), quant=quant)
    message = str(caught.value)
    assert str(path) in message and "tensor blk.1.attn_k.bias is a bias" in message, message


def test_shape_disagreeing_with_config(tmp_path: Path) -> None:
    tensors = tiny_gguf_tensors(TINY)
    tensors["blk.1.attn_q.weight"] = tensors["blk.1.attn_q.weight"][:, :16].copy()
    path = write_gguf(tmp_path / "t.gguf", tensors)
    with pytest.raises(ModelFileError, match=r"blk\.1\.attn_q\.weight has shape \(32, 16\), "
                                             r"expected \(32, 32\) from the config") as caught:
        load_gguf_state_dict(GGUFFile(path), TINY, torch.float32)
    assert str(path) in str(caught.value)


def test_missing_tensor(tmp_path: Path) -> None:
    tensors = tiny_gguf_tensors(TINY)
    del tensors["blk.0.ffn_up.weight"]
    path = write_gguf(tmp_path / "t.gguf", tensors)
    with pytest.raises(ModelFileError, match=r"lacks 1 tensor\(s\).*blk\.0\.ffn_up\.weight"):
        load_gguf_state_dict(GGUFFile(path), TINY, torch.float32)


def test_tensor_beyond_config_layers(tmp_path: Path) -> None:
    one_layer = TINY.replace(num_layers=1)
    with pytest.raises(ModelFileError, match=r"blk\.1\.\S+ is not part of the model"):
        load_gguf_state_dict(GGUFFile(write_gguf(tmp_path / "t.gguf", tiny_gguf_tensors(TINY))),
                             one_layer, torch.float32)


def test_unsupported_tensor_type_named_on_load(tmp_path: Path) -> None:
    packed = np.zeros((2, gguf.GGML_QUANT_SIZES[QT.IQ2_XXS][1]), np.uint8)  # 2 blocks of 256
    f = GGUFFile(write_gguf(tmp_path / "t.gguf", {"x.weight": packed},
                            raw_dtypes={"x.weight": QT.IQ2_XXS}))
    assert f.tensor_shape("x.weight") == (2, 256) and f.tensor_type("x.weight") == QT.IQ2_XXS
    with pytest.raises(ModelFileError, match=r"tensor x\.weight: .*IQ2_XXS is not supported"):
        f.load("x.weight")


def test_load_and_unknown_name(small_file: Path) -> None:
    f = GGUFFile(small_file)
    assert f.metadata["test.numbers"] == [1, 2, 3]
    assert torch.equal(f.load("b.weight", torch.float16), torch.arange(16, dtype=torch.float16))
    with pytest.raises(ModelFileError, match=r"no tensor named 'c\.weight'"):
        f.load("c.weight")


# --- broken files ------------------------------------------------------------------------

def test_truncated_real_file(smollm2_gguf: Path, tmp_path: Path) -> None:
    half = tmp_path / "half.gguf"
    with open(smollm2_gguf, "rb") as src, open(half, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
        dst.truncate(smollm2_gguf.stat().st_size // 2)
    assert_file_error(half, "lies past the end of the file")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(half.read_bytes()[:1_000_000])  # cut inside the merges array
    assert_file_error(header_only, "truncated", "tokenizer.ggml.merges")


def test_a_bad_vocabulary_string_is_named_where_it_is(smollm2_gguf: Path, tmp_path: Path) -> None:
    """The vocabulary's strings are read without per-string checks; a bad one is still named
    with its field and byte, as the checked reading names it."""
    data = bytearray(smollm2_gguf.read_bytes()[:4_000_000])  # the header and then some
    key = b"tokenizer.ggml.tokens"
    first = data.index(key) + len(key) + 4 + 4 + 8  # value type, item type, count
    (length,) = struct.unpack_from("<Q", data, first)
    second = first + 8 + length  # the second token's length field
    (second_length,) = struct.unpack_from("<Q", data, second)
    bad_utf8 = bytearray(data)
    bad_utf8[second + 8] = 0xFF
    (tmp_path / "utf8.gguf").write_bytes(bad_utf8)
    assert_file_error(tmp_path / "utf8.gguf", "'tokenizer.ggml.tokens': invalid UTF-8 at byte "
                                              f"{second + 8}")
    too_long = bytearray(data)
    struct.pack_into("<Q", too_long, second, 1 << 62)
    (tmp_path / "long.gguf").write_bytes(too_long)
    assert_file_error(tmp_path / "long.gguf", "truncated", "'tokenizer.ggml.tokens' at byte "
                      f"{second + 8} needs {1 << 62} bytes")
    assert second_length < 64  # the field patched was a token's length, not something else


def test_missing_and_tiny_files(tmp_path: Path) -> None:
    assert_file_error(tmp_path / "nope.gguf", "no such file")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF\x03\x00")
    assert_file_error(tmp_path / "tiny.gguf", "too small")


def test_wrong_magic_and_version(small_file: Path) -> None:
    patch(small_file, 4, "<I", 3 << 24)
    assert_file_error(small_file, "version 50331648", "big-endian")
    patch(small_file, 0, "<4s", b"GGML")
    assert_file_error(small_file, "not a GGUF file")


def test_absurd_counts(small_file: Path) -> None:
    patch(small_file, 8, "<Q", 1 << 62)
    assert_file_error(small_file, f"{1 << 62} tensors")
    patch(small_file, 8, "<Q", 2)
    patch(small_file, 16, "<Q", 1 << 40)
    assert_file_error(small_file, "metadata keys")


def test_absurd_array_length(small_file: Path) -> None:
    key = b"test.numbers"
    count_at = small_file.read_bytes().index(key) + len(key) + 8  # after value and item types
    patch(small_file, count_at, "<Q", 1 << 60)
    assert_file_error(small_file, "truncated", "'test.numbers'")


def test_tensor_offset_past_end(small_file: Path) -> None:
    patch(small_file, tensor_info_position(small_file, "b.weight", 1)["offset"], "<Q", 1 << 30)
    assert_file_error(small_file, "tensor b.weight", "past the end of the file")


def test_misaligned_and_overlapping_tensors(small_file: Path) -> None:
    offset_at = tensor_info_position(small_file, "b.weight", 1)["offset"]
    patch(small_file, offset_at, "<Q", 8)
    assert_file_error(small_file, "tensor b.weight", "not a multiple of 32")
    patch(small_file, offset_at, "<Q", 0)
    assert_file_error(small_file, "tensor b.weight overlaps tensor a.weight")


def test_bad_tensor_type_and_dims(small_file: Path) -> None:
    where = tensor_info_position(small_file, "a.weight", 2)
    patch(small_file, where["type"], "<I", 99)
    assert_file_error(small_file, "tensor a.weight has unknown type 99")
    patch(small_file, where["type"], "<I", int(QT.F32))
    patch(small_file, where["dims"], "<Q", 0)
    assert_file_error(small_file, "tensor a.weight has a zero dimension")
    patch(small_file, where["dims"], "<Q", 12)  # [4, 12] float32 runs into b.weight
    assert_file_error(small_file, "tensor b.weight overlaps tensor a.weight")
    patch(small_file, where["dims"], "<Q", 8)
    patch(small_file, where["type"], "<I", int(QT.Q8_0))
    assert_file_error(small_file, "tensor a.weight", "blocks of 32 values")


def test_random_corruption_gives_model_file_error_or_a_valid_file(small_file: Path) -> None:
    """Any damage to the header reads as a ModelFileError, never another exception."""
    original = small_file.read_bytes()
    rng = np.random.default_rng(0)
    for _ in range(300):
        data = bytearray(original)
        position = int(rng.integers(0, 256))  # header and tensor infos
        width = int(rng.choice([1, 8]))
        data[position:position + width] = rng.integers(0, 256, width, dtype=np.uint8).tobytes()
        small_file.write_bytes(bytes(data[:int(rng.integers(24, len(data) + 1))]))
        try:
            GGUFFile(small_file)
        except ModelFileError:
            pass
