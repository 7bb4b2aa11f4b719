"""The C++ kernels' library: compiled for this CPU on first use, cached, loaded once.

The sources (csrc/) compile into one library of `levante_quant` ops: the quantized matmuls,
the GGUF repack and paged attention; kernels.py calls them. The cache key is the sources'
bytes, torch's version and place, the CPU and the compiler flags, so a changed source or a
new CPU builds again. Setting LEVANTE_QUANT_KERNEL=torch skips the library (PyTorch paths).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("levante.quant.kernels")  # the name users' logging already sees

# Compiled together into one library (the `levante_quant` ops); each file's bytes (and those of
# the headers they include) key the cache.
_CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(_CSRC / name
                for name in ("q_gemm.cpp", "paged_attention.cpp", "k_gemm.cpp", "repack.cpp"))
HEADERS = tuple(sorted(_CSRC.rglob("*.h")))
# Set to "torch" to skip the C++ kernels, matmul and attention (e.g. to compare paths);
# anything else means "auto".
KERNEL_ENV = "LEVANTE_QUANT_KERNEL"

@dataclass(frozen=True)
class LoadedKernels:
    """The loaded library's ops."""

    isa: str  # "avx512+vnni", "avx2+vnni", "avx2" or "scalar": what the compiler targeted
    qlinear: Callable[..., torch.Tensor]
    quantize_rows: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    paged_decode_attention: Callable[..., torch.Tensor]
    paged_attention: Callable[..., torch.Tensor]
    kquant_linear: Callable[..., torch.Tensor]
    quantize_rows_k: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    kquant_types: Callable[[], list[int]]
    repack_blocks: Callable[..., None]


_LOAD_LOCK = threading.Lock()  # first calls from several threads build and register once


def loaded_kernels() -> LoadedKernels | None:
    """The loaded kernels, or None for the PyTorch path (decided once per process)."""
    with _LOAD_LOCK:
        return _load_kernel()


@functools.cache
def _load_kernel() -> LoadedKernels | None:
    """Build (if needed) and load the kernel; log which path runs."""
    if os.environ.get(KERNEL_ENV) == "torch":
        logger.info("quantized matmul: PyTorch dequantize + F.linear, paged attention: "
                    "gather + SDPA (%s=torch)", KERNEL_ENV)
        return None
    try:
        library = _build()
        torch.ops.load_library(str(library))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr if isinstance(e, subprocess.CalledProcessError) else e
        logger.warning("quantized matmul: could not build or load %s (%s); falling back to "
                       "PyTorch dequantize + F.linear, which is much slower (and paged "
                       "attention to gather + SDPA)",
                       ", ".join(map(str, SOURCES)), detail)
        return None
    torch.library.register_fake("levante_quant::qlinear")(_qlinear_shape)
    torch.library.register_fake("levante_quant::paged_decode_attention")(_attention_shape)
    torch.library.register_fake("levante_quant::paged_attention")(_prefill_attention_shape)
    torch.library.register_fake("levante_quant::kquant_linear")(_kquant_shape)
    ops = torch.ops.levante_quant
    kernel = LoadedKernels(str(ops.isa()), ops.qlinear.default, ops.quantize_rows.default,
                     ops.paged_decode_attention.default, ops.paged_attention.default,
                     ops.kquant_linear.default,
                     ops.quantize_rows_k.default, ops.kquant_types.default,
                     ops.repack_blocks.default)
    logger.info("quantized matmul, paged attention: compiled kernels (%s, %d threads) from %s",
                kernel.isa, torch.get_num_threads(), library)
    return kernel


def _qlinear_shape(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
                   qtype: int) -> torch.Tensor:
    """Output shape for tracing (torch.compile): [M, N]."""
    return x.new_empty(x.shape[0], qs.shape[0])


def _kquant_shape(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """Output shape for tracing: [M, N]."""
    return x.new_empty(x.shape[0], blocks.shape[0])


def _attention_shape(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                     scale: float, k_scales: torch.Tensor | None = None,
                     v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Output shape for tracing: q's, [B, H, D]."""
    return q.new_empty(q.shape)


def _prefill_attention_shape(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, context_lens: torch.Tensor,
                             query_lens: torch.Tensor, block_size: int,
                             scale: float, k_scales: torch.Tensor | None = None,
                             v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Output shape for tracing: q's, [T, H, D]."""
    return q.new_empty(q.shape)


def _compile_flags(arch: str = "native") -> list[str]:
    """The compiler and its flags, paths aside; -march=native by default: the cached library
    never leaves this CPU."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", f"-march={arch}", "-fopenmp", "-std=c++20", "-fPIC", "-shared",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def compile_command(output: Path, *, arch: str = "native") -> list[str]:
    """The compiler call (imports torch.utils.cpp_extension, ~0.15 s: only to build)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    lib_dir = library_paths()[0]
    compiler, *flags = _compile_flags(arch)
    return [compiler, *flags, *(f"-I{p}" for p in include_paths()), *map(str, SOURCES), "-o",
            str(output), f"-L{lib_dir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib_dir}"]


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))


def _build() -> Path:
    """Compile csrc/*.cpp once per (sources, torch, CPU); later calls find the cache.

    We call the compiler ourselves rather than `torch.utils.cpp_extension.load` because
    that one insists on a `ninja` binary on PATH, which a venv's python run without
    activation does not see even when the `ninja` wheel is installed.
    """
    from levante.weights.store import levante_home

    key = hashlib.sha256()
    # The command's include and library paths are torch's own folders: torch's location and
    # version key them without importing cpp_extension on every start.
    for part in (*(source.read_bytes() for source in (*SOURCES, *HEADERS)),
                 torch.__version__.encode(), str(Path(torch.__file__).parent).encode(),
                 _cpu_fingerprint().encode(), " ".join(_compile_flags()).encode(),
                 sys.version.encode()):
        key.update(part)
    folder = levante_home() / "kernels"
    library = folder / f"levante_quant-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    logger.warning("compiling the quantized matmul and paged attention kernels for this CPU "
                   "(once, ~30-60 s)...")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        partial = Path(scratch) / library.name
        subprocess.run(compile_command(partial), check=True, capture_output=True, text=True)
        os.replace(partial, library)  # atomic: a concurrent build never sees half a file
    logger.warning("compiled %s in %.1f s", library, time.perf_counter() - start)
    return library
