"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from levante.quant import kernel_library


@pytest.fixture(scope="session")
def run_portable_check(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., None]:
    """Runs a script against the no-AVX2 build (plain loops) of the kernel library.

    The library (matmul and attention sources together) is compiled once per session
    (~40 s); the script gets its path as argv[1] and must print "ok".
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable build is checked with x86 flags")
    library = tmp_path_factory.mktemp("portable") / "levante_quant_portable.so"
    subprocess.run(kernel_library.compile_command(library, arch="x86-64"), check=True)

    def run(script: str, *args: str) -> None:
        out = subprocess.run([sys.executable, "-c", script, str(library), *args],
                             check=False, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

    return run


@pytest.fixture(scope="session")
def run_clang_check(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., None]:
    """As `run_portable_check`, against the library built by clang (macOS's compiler) for
    this CPU; skipped where clang or its OpenMP header (Debian: libomp-dev) is missing."""
    clang = shutil.which("clang++")
    if clang is None:
        pytest.skip("clang++ is not installed")
    library = tmp_path_factory.mktemp("clang") / "levante_quant_clang.so"
    command = [clang, *kernel_library.compile_command(library)[1:]]
    built = subprocess.run(command, check=False, capture_output=True, text=True)
    if built.returncode != 0 and "omp.h" in built.stderr:
        pytest.skip("clang has no OpenMP header (libomp-dev)")
    assert built.returncode == 0, built.stderr[-2000:]

    def run(script: str, *args: str) -> None:
        out = subprocess.run([sys.executable, "-c", script, str(library), *args],
                             check=False, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

    return run


@pytest.fixture(scope="session")
def run_arch_check(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., None]:
    """As `run_portable_check`, against the library built for an older x86 target than this
    CPU: `run(arch, script, *args)`. "x86-64-v3" (AVX2 without VNNI: maddubs) and
    "alderlake" (AVX-VNNI, 256-bit) keep the paths tested that an AVX-512 machine never runs.
    Each library is compiled once per session (~25 s)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the x86 builds are checked with x86 flags")
    libraries: dict[str, str] = {}

    def run(arch: str, script: str, *args: str) -> None:
        if arch == "alderlake" and "avx_vnni" not in _cpu_flags():
            pytest.skip("this CPU has no AVX-VNNI to run the alderlake build (it stops on SIGILL)")
        if arch not in libraries:
            library = tmp_path_factory.mktemp(arch) / f"levante_quant_{arch}.so"
            subprocess.run(kernel_library.compile_command(library, arch=arch), check=True)
            libraries[arch] = str(library)
        out = subprocess.run([sys.executable, "-c", script, libraries[arch], *args],
                             check=False, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

    return run


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in info.splitlines() if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()}
