"""Compile every CUDA kernel file with nvcc, without a GPU.

The CPU torch wheel ships the CUDA headers except the generated
c10/cuda/impl/cuda_cmake_macros.h; tests/cuda_shim provides it (test-only).
Each csrc/cuda/*.cu is compiled with torch's include paths and the flags
torch.utils.cpp_extension.CUDAExtension uses, for sm_90. All files are
compiled once, in parallel (one process per core), the first time any
parametrized case runs; each case then reports its own file's result.
"""

import concurrent.futures
import functools
import inspect
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SHIM = Path(__file__).resolve().parent / "cuda_shim"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.cuda_compile


def _cxx_standard():
    # Whatever this torch's CUDAExtension passes to nvcc (c++20 from torch 2.10 on).
    return "c++20" if "'-std=c++20'" in inspect.getsource(cpp_extension) else "c++17"


def nvcc_command(source, output):
    flags = getattr(cpp_extension, "COMMON_NVCC_FLAGS", [
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr"])
    includes = [f"-I{SHIM}", f"-I{ROOT / 'csrc'}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [NVCC, "-c", str(source), "-o", str(output), *includes, f"-std={_cxx_standard()}",
            "-gencode", "arch=compute_90,code=sm_90", *flags, "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            "-Xcompiler", "-fPIC", "-diag-suppress", "3306"]


def _compile(source, outdir):
    start = time.perf_counter()
    proc = subprocess.run(nvcc_command(source, Path(outdir) / (source.stem + ".o")),
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def _compile_all(outdir):
    workers = max(1, min(len(SOURCES), os.cpu_count() or 1))
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = dict(zip(SOURCES, pool.map(lambda s: _compile(s, outdir), SOURCES)))
    print(f"\ncompiled {len(SOURCES)} CUDA files with {workers} workers in "
          f"{time.perf_counter() - start:.1f}s")
    return results


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile_all(str(tmp_path_factory.mktemp("cuda_objects")))


def test_cuda_sources_exist():
    assert SOURCES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_cuda_compiles(source, compiled):
    returncode, log, seconds = compiled[source]
    assert returncode == 0, f"nvcc failed on {source.name} ({seconds:.1f}s):\n{log[-20000:]}"
