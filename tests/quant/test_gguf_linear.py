"""GGUF weights kept quantized: each block format against dequantize-then-matmul, SmolLM2 whole."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants
from torch import nn

from levante.config import ModelConfig
from levante.model import Transformer
from levante.quant import kernels
from levante.quant.gguf_blocks import dequantize
from levante.quant.gguf_linear import (
    BlockKernelLinear,
    GGUFEmbedding,
    KQuantLinear,
    RawBlockLinear,
    model_nbytes,
)
from levante.quant.gguf_model import (
    k_quant_codes,
    load_gguf_quantized,
    read_linear,
    read_linears,
    read_rows,
)
from levante.quant.linear import Int4Linear
from levante.weights.gguf import GGUFFile, load_gguf_state_dict
from levante.weights.layout import interleaved_to_half

Q = GGMLQuantizationType
ROWS, COLS = 64, 512
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K, Q.IQ4_XS)
# F16 scale fields of each K-quant super-block (byte offsets), set to small finite values.
SCALE_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q3_K: (108,),
                Q.Q2_K: (80, 82), Q.IQ4_XS: (0,)}


def module_for(qtype: GGMLQuantizationType) -> type[nn.Module]:
    """The module `read_linear` builds for a type: compiled K-quant kernel where registered."""
    if qtype in kernels.KQUANT_TYPES:
        return KQuantLinear
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        return BlockKernelLinear
    return {Q.Q4_K: Int4Linear, Q.Q5_K: Int4Linear, Q.F16: nn.Linear}.get(qtype, RawBlockLinear)


def random_k_blocks(qtype: GGMLQuantizationType, num_blocks: int, seed: int) -> np.ndarray:
    """Random K-quant super-blocks with finite, small f16 scales (d, dmin or Q6_K's d)."""
    rng = np.random.default_rng(seed)
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (num_blocks, type_size), dtype=np.uint8)
    for start in SCALE_FIELDS[qtype]:
        scales = rng.uniform(1e-4, 2e-3, (num_blocks, 1)).astype(np.float16).view(np.uint8)
        blocks[:, start:start + 2] = scales
    return blocks


@pytest.fixture(scope="module")
def typed_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF holding one [64, 512] weight per block format our linears handle."""
    path = tmp_path_factory.mktemp("gguf") / "typed.gguf"
    writer = GGUFWriter(path, arch="llama")
    gen = np.random.default_rng(0)
    weight = gen.normal(0, 0.02, (ROWS, COLS)).astype(np.float32)
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        writer.add_tensor(qtype.name, quants.quantize(weight, qtype), raw_dtype=qtype)
    for qtype in K_TYPES:
        blocks = random_k_blocks(qtype, ROWS * COLS // 256, seed=int(qtype))
        writer.add_tensor(qtype.name, blocks.reshape(ROWS, -1), raw_dtype=qtype)
    writer.add_tensor("F16", weight.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K])
def test_k_quant_codes_are_bit_exact(qtype: GGMLQuantizationType) -> None:
    blocks = torch.from_numpy(random_k_blocks(qtype, 16, seed=7))
    codes, scales, offsets = k_quant_codes(blocks, qtype)
    assert codes.max() < (16 if qtype == Q.Q4_K else 32)
    values = codes.float().view(16, 8, 32) * scales[..., None] + offsets[..., None]
    expected = dequantize(blocks.reshape(-1), qtype, (16, 256))
    assert torch.equal(values.view(16, 256), expected)


def test_read_rows_equals_the_mapped_bytes(typed_gguf: Path) -> None:
    gguf_file = GGUFFile(typed_gguf)
    with open(typed_gguf, "rb") as handle:
        for name in gguf_file.tensor_names:
            rows = read_rows(handle, gguf_file, name)
            assert rows.shape[0] == ROWS
            assert torch.equal(rows.reshape(-1), gguf_file.raw(name))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, *K_TYPES, Q.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("num_heads", [None, 4])
def test_each_format_equals_dequantize_then_matmul(typed_gguf: Path, qtype: GGMLQuantizationType,
                                                   num_heads: int | None) -> None:
    gguf_file = GGUFFile(typed_gguf)
    with open(typed_gguf, "rb") as handle:
        layer = read_linear(gguf_file, qtype.name, handle, dtype=torch.float32,
                            num_heads=num_heads)
    assert type(layer) is module_for(qtype)
    weight = gguf_file.load(qtype.name)
    if num_heads is not None:
        weight = interleaved_to_half(weight, num_heads)
    x = torch.randn(3, COLS, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x, weight)
    out = layer(x)
    scale = expected.abs().max()
    if type(layer) in (RawBlockLinear, nn.Linear):  # float weights as stored: float32 exact
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * scale)
    elif type(layer) is Int4Linear:  # bf16 activations, scales and offsets
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * scale)
    else:  # the kernels quantize activations to 8 bits per block of 32 (K-quants: 256)
        torch.testing.assert_close(out, expected, rtol=0.05, atol=0.03 * scale)
        assert F.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.999


@pytest.mark.parametrize(("name", "num_heads"), [("blk.0.attn_q.weight", 9),
                                                 ("blk.0.attn_k.weight", 3),
                                                 ("token_embd.weight", None)])
def test_chunked_repack_equals_whole(smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch,
                                     name: str, num_heads: int | None) -> None:
    from levante.quant import gguf_model as module
    from levante.quant import kernels

    gguf_file = GGUFFile(smollm2_gguf)
    rows = gguf_file.raw(name).view(gguf_file.tensor_shape(name)[0], -1)
    if num_heads is not None:
        rows = interleaved_to_half(rows, num_heads)
    whole = kernels.repack(gguf_file.tensor_type(name), rows, gguf_file.tensor_shape(name))
    monkeypatch.setattr(module, "CHUNK_BYTES", 5000)  # odd-sized chunks, many of them
    chunked = kernels.empty_packed(gguf_file.tensor_type(name), gguf_file.tensor_shape(name))
    module._repack_in_chunks(gguf_file, name, num_heads, chunked)
    assert torch.equal(chunked.qs, whole.qs) and torch.equal(chunked.d, whole.d)
    assert (chunked.m is None) == (whole.m is None)
    assert chunked.m is None or torch.equal(chunked.m, whole.m)


def test_q_k_v_are_read_into_one_allocation_that_fusion_reuses(smollm2_gguf: Path) -> None:
    """read_linears gives each part the arrays read_linear would, as rows of one tensor, and
    the fused layer is those rows (no copy) computing what the parts compute."""
    gguf_file = GGUFFile(smollm2_gguf)
    names = [f"blk.3.attn_{p}.weight" for p in "qkv"]
    heads = [9, 3, None]
    with open(smollm2_gguf, "rb") as handle:
        parts = read_linears(gguf_file, names, handle, dtype=torch.float32, num_heads=heads)
        alone = [read_linear(gguf_file, name, handle, dtype=torch.float32, num_heads=h)
                 for name, h in zip(names, heads)]
    for part, single in zip(parts, alone):
        assert isinstance(part, BlockKernelLinear) and isinstance(single, BlockKernelLinear)
        assert torch.equal(part.weight_packed.to_raw(), single.weight_packed.to_raw())
    qs = [p.weight_packed.qs for p in parts if isinstance(p, BlockKernelLinear)]
    assert qs[1].data_ptr() == qs[0].data_ptr() + qs[0].nbytes  # consecutive rows
    joined = BlockKernelLinear.concat(parts)
    assert joined is not None and joined.weight_packed.qs.data_ptr() == qs[0].data_ptr()
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(joined(x), torch.cat([s(x) for s in alone], -1), rtol=0, atol=0)


def test_k_quant_parts_are_read_into_one_allocation_that_fusion_reuses(typed_gguf: Path
                                                                      ) -> None:
    gguf_file = GGUFFile(typed_gguf)
    names = ["Q4_K", "Q4_K"]  # gate/up-like: one type, one width
    with open(typed_gguf, "rb") as handle:
        parts = read_linears(gguf_file, names, handle, dtype=torch.float32,
                             num_heads=[None, None])
        rows = read_rows(handle, gguf_file, "Q4_K")
    blocks = [p.blocks for p in parts if isinstance(p, KQuantLinear)]
    assert len(blocks) == 2 and all(torch.equal(b, rows) for b in blocks)
    assert blocks[1].data_ptr() == blocks[0].data_ptr() + blocks[0].nbytes
    joined = KQuantLinear.concat(parts)
    assert joined is not None and joined.blocks.data_ptr() == blocks[0].data_ptr()
    x = torch.randn(3, COLS, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(joined(x), torch.cat([p(x) for p in parts], -1), rtol=0, atol=0)


def test_parts_that_cannot_share_one_allocation_are_read_alone(typed_gguf: Path) -> None:
    """Different types (or widths) cannot run as one matmul: each part is read as read_linear
    reads it, and concat then joins nothing."""
    gguf_file = GGUFFile(typed_gguf)
    names = ["Q4_1", "Q8_0"]
    with open(typed_gguf, "rb") as handle:
        parts = read_linears(gguf_file, names, handle, dtype=torch.float32,
                             num_heads=[None, None])
    assert [p.weight_packed.qtype for p in parts if isinstance(p, BlockKernelLinear)] == \
        [Q.Q4_1, Q.Q8_0]
    assert BlockKernelLinear.concat(parts) is None


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> tuple[GGUFFile, ModelConfig]:
    gguf_file = GGUFFile(smollm2_gguf)
    config = ModelConfig.from_gguf(gguf_file.metadata, has_output_tensor=False)
    return gguf_file, config.replace(max_seq_len=256)


def test_smollm2_quantized_matches_the_float_model(smollm2: tuple[GGUFFile, ModelConfig],
                                                   smollm2_gguf: Path) -> None:
    gguf_file, config = smollm2
    quantized = load_gguf_quantized(gguf_file, config, torch.float32)
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, BlockKernelLinear)
    assert isinstance(quantized.lm_head, BlockKernelLinear)  # the tied head, Q8_0
    assert isinstance(quantized.model.embed_tokens, GGUFEmbedding)
    assert model_nbytes(quantized) <= smollm2_gguf.stat().st_size
    state = load_gguf_state_dict(gguf_file, config, torch.float32)
    reference = Transformer.from_state_dict(config, state)
    ids = torch.randint(0, config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(quantized.model.embed_tokens(ids),
                                   reference.model.embed_tokens(ids), rtol=0, atol=0)
        expected = reference.logits(reference(ids))
        out = quantized.logits(quantized(ids))
    assert F.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.99
    assert (out.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8


_CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    import torch
    from levante import LLM  # the public API: engine, tokenizers, bundle
    # Both processes import what the load uses, so the difference is the load's data.
    from levante.config import EngineConfig, ModelConfig
    from levante.engine.engine import Engine
    from levante.engine.sampling_params import SamplingParams
    from levante.heap import compact_heap
    from levante.quant.gguf_model import load_gguf_quantized
    from levante.weights.gguf import GGUFFile

    PAGE = os.sysconf("SC_PAGE_SIZE")
    peak, done = [0], threading.Event()

    def anonymous() -> int:  # resident minus file-backed pages (/proc/self/statm)
        with open("/proc/self/statm") as f:
            resident, shared = (int(v) for v in f.read().split()[1:3])
        return (resident - shared) * PAGE

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    mapped = 0
    if sys.argv[1] == "load":
        gguf_file = GGUFFile(sys.argv[2])
        config = ModelConfig.from_gguf(gguf_file.metadata, has_output_tensor=False)
        with compact_heap():  # as bundle.load does
            model = load_gguf_quantized(gguf_file, config.replace(max_seq_len=256),
                                        torch.float32)
        engine = Engine(model, None, EngineConfig(max_model_len=256, num_kv_blocks=1))
        engine.add_request([1, 504, 3458, 282, 4649, 314], SamplingParams(max_tokens=1))
        while engine.has_work:
            engine.step()
        # The model file's own pages in memory (the embedding's looked-up rows).
        lines = open("/proc/self/smaps").read().splitlines()
        for i, line in enumerate(lines):
            if line.endswith(sys.argv[2]):
                rss = next(x for x in lines[i + 1:] if x.startswith("Rss:"))
                mapped += int(rss.split()[1]) * 1024
    done.set()
    sampler.join()
    peak[0] = max(peak[0], anonymous())
    print(json.dumps({"peak_anonymous": peak[0], "model_file_resident": mapped}))
""")


def _measure(*args: str) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mapped_kib(address: int) -> int:
    """Resident KiB of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("loader", ["blocks", "dequantized"])
def test_a_load_leaves_none_of_the_file_mapped(smollm2: tuple[GGUFFile, ModelConfig],
                                               loader: str) -> None:
    """The weights are repacked (or dequantized) from the file's map chunk by chunk;
    afterwards none of its pages count in this process's RSS (they stay in the page cache),
    including those the kernel's fault-around mapped beside chunks already dropped."""
    gguf_file, config = smollm2
    before = _mapped_kib(gguf_file.raw("token_embd.weight").data_ptr())
    if loader == "blocks":
        model = load_gguf_quantized(gguf_file, config, torch.float32)
        assert isinstance(model.model.layers[0].mlp.up_proj, BlockKernelLinear)
    else:
        state = load_gguf_state_dict(gguf_file, config, torch.bfloat16)
        assert state["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    after = _mapped_kib(gguf_file.raw("token_embd.weight").data_ptr())
    assert after < 256, f"{after} KiB of the file still mapped after the load ({before} before)"


@pytest.mark.slow  # two cold processes that load the model: ~10 s
def test_loading_q4_1_adds_less_than_1_5x_the_file(smollm2_gguf: Path) -> None:
    """Peak memory of load + one generated token, minus a process that only imports levante.

    Counted: anonymous memory (sampled every millisecond: the load's own arrays and
    temporaries) plus the model file's pages that stay mapped. Not counted: pages of PyTorch's
    libraries, which differ by CPU (its AVX-512 kernels are other pages than its AVX2 ones)
    and are shared and clean; measured by peak RSS, this test passed here (1.35x) and failed
    on CI's machine (1.61x) with the same code.
    """
    baseline = _measure("import")
    loaded = _measure("load", str(smollm2_gguf))
    added = loaded["peak_anonymous"] - baseline["peak_anonymous"] + loaded["model_file_resident"]
    size = smollm2_gguf.stat().st_size
    assert added < 1.5 * size, f"loading added {added / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    assert added > 0.9 * size  # the weights are in memory: the measure sees them


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0])
def test_concat_equals_the_parts_and_shares_their_arrays(qtype: GGMLQuantizationType) -> None:
    """Stacked q/k/v-like parts (kernel panels of 8 rows) compute exactly what the parts do."""
    from levante.quant import kernels

    generator = torch.Generator().manual_seed(4)
    parts = []
    for rows in (8, 16, 6):  # only the last may have a partial panel
        values = torch.randn(rows, 64, generator=generator).numpy()
        raw = torch.from_numpy(quants.quantize(values, qtype).reshape(-1).copy())
        parts.append(BlockKernelLinear(kernels.repack(qtype, raw, (rows, 64))))
    x = torch.randn(3, 64, generator=generator)
    expected = torch.cat([p(x) for p in parts], dim=-1)
    joined = BlockKernelLinear.concat(parts)
    assert joined is not None and joined.out_features == 30
    torch.testing.assert_close(joined(x), expected, rtol=0, atol=0)
    assert parts[1].weight_packed.qs.data_ptr() == joined.weight_packed.qs[8:].data_ptr()
    torch.testing.assert_close(torch.cat([p(x) for p in parts], dim=-1), expected, rtol=0, atol=0)
    assert BlockKernelLinear.concat([parts[2], parts[0]]) is None  # 6 rows, then more: misaligned
    assert BlockKernelLinear.concat([parts[0], parts[2], parts[2]]) is None
