"""Compile every CUDA source without a GPU, and check what can be checked on
the host.

* The kernels (csrc/cuda/*.cu) are compiled by nvcc for sm_90 with no torch
  include path at all: they must stay torch-free (csrc/cuda/launch.h says
  why), and this is what keeps them so.
* The CUDA op files (csrc/cuda/*.cpp: checks, allocation, launches) are
  compiled by the host compiler through nvcc (which adds the CUDA include
  path), against the CPU wheel's torch headers. The wheel lacks one generated
  header, c10/cuda/impl/cuda_cmake_macros.h; tests/cuda_shim provides it
  (test-only).
* The kernels' 32-bit index divider (csrc/cuda/divider.h) is host-callable:
  tests/native/divider_check.cpp checks it against integer division.
* The standalone timing harness (benchmarks/cuda_harness) builds from the
  kernel objects compiled here, and its --plan mode runs without a GPU.

All files compile once, in parallel (one process per core), the first time a
case needs them; each case then reports its own file's result.
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

from benchmarks import kernels

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
SHIM = Path(__file__).resolve().parent / "cuda_shim"
KERNELS = sorted(CUDA_DIR.glob("*.cu"))
OP_FILES = sorted(CUDA_DIR.glob("*.cpp"))
DIVIDER_CHECK = Path(__file__).resolve().parent / "native" / "divider_check.cpp"
HARNESS_BUILD = ROOT / "benchmarks" / "cuda_harness" / "build.sh"
NVCC = shutil.which("nvcc")

pytestmark = [pytest.mark.cuda_compile, pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")]


def _cxx_standard():
    # Whatever this torch's CUDAExtension passes to nvcc (c++20 from torch 2.10 on).
    return "c++20" if "'-std=c++20'" in inspect.getsource(cpp_extension) else "c++17"


# The defines CUDAExtension gives nvcc; the kernels must build under them.
NVCC_FLAGS = getattr(cpp_extension, "COMMON_NVCC_FLAGS", [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr"])


def kernel_command(source, output):
    """nvcc for a kernel file: csrc only on the include path (no torch)."""
    return [NVCC, "-c", str(source), "-o", str(output), f"-I{CSRC}", f"-std={_cxx_standard()}",
            "-gencode", "arch=compute_90,code=sm_90", *NVCC_FLAGS, "-O3", "-Xcompiler", "-fPIC"]


def op_file_command(source, output):
    """The host compiler (via nvcc, for the CUDA include path) for an op file, with torch's headers."""
    includes = [f"-I{SHIM}", f"-I{CSRC}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [NVCC, "-x", "c++", "-c", str(source), "-o", str(output), *includes, f"-std={_cxx_standard()}",
            "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            "-Xcompiler", "-fPIC,-Wall"]


def _run(command):
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def _compile_all(outdir):
    jobs = {s: kernel_command(s, Path(outdir) / (s.stem + ".o")) for s in KERNELS}
    jobs.update({s: op_file_command(s, Path(outdir) / (s.stem + ".op.o")) for s in OP_FILES})
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    print(f"\ncompiled {len(jobs)} CUDA files with {workers} workers in {time.perf_counter() - start:.1f}s")
    return results


@pytest.fixture(scope="module")
def object_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_objects")


@pytest.fixture(scope="module")
def compiled(object_dir):
    return _compile_all(str(object_dir))


@pytest.fixture(scope="module")
def harness(compiled, object_dir):
    """(binary, returncode, log, seconds) of build.sh linking the kernel objects
    compiled above: one extra nvcc compile, harness.cu's."""
    binary = object_dir / "bnfast_harness"
    returncode, log, seconds = _run(["bash", str(HARNESS_BUILD), "--objects", str(object_dir), "-o", str(binary)])
    print(f"\nbuilt the CUDA harness in {seconds:.1f}s")
    return binary, returncode, log, seconds


def test_cuda_sources_exist():
    assert KERNELS and OP_FILES, f"no .cu / .cpp files under {CUDA_DIR}"
    # Every kernel file has its op file, and every op file its kernels.
    assert {s.stem for s in OP_FILES} == {s.stem.removesuffix("_kernel") for s in KERNELS}


@pytest.mark.parametrize("source", KERNELS + OP_FILES, ids=[s.name for s in KERNELS + OP_FILES])
def test_cuda_source_compiles(source, compiled):
    returncode, log, seconds = compiled[source]
    assert returncode == 0, f"compiling {source.name} failed ({seconds:.1f}s):\n{log[-20000:]}"
    assert "warning" not in log.lower(), f"{source.name} compiled with warnings:\n{log[-20000:]}"


def test_index_divider_matches_integer_division(tmp_path):
    binary = tmp_path / "divider_check"
    compiler = cpp_extension.get_cxx_compiler()
    build = subprocess.run([compiler, "-O2", "-std=c++17", f"-I{CSRC}", str(DIVIDER_CHECK), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_harness_builds(harness):
    _, returncode, log, seconds = harness
    assert returncode == 0, f"building the CUDA harness failed ({seconds:.1f}s):\n{log[-20000:]}"
    assert "warning" not in log.lower(), f"the CUDA harness built with warnings:\n{log[-20000:]}"


def test_harness_build_uses_the_ci_flags():
    # build.sh compiles the kernels as kernel_command does (sm_90 by default), without importing torch.
    script = HARNESS_BUILD.read_text()
    for flag in [*NVCC_FLAGS, f"-std={_cxx_standard()}", "-O3", "ARCH=90"]:
        assert flag in script, f"{HARNESS_BUILD.name} lacks {flag}"


def test_harness_plans_every_default_case_without_a_gpu(harness):
    binary, returncode, _, _ = harness
    if returncode != 0:
        pytest.skip("the harness did not build (test_harness_builds says why)")
    # No device visible: --plan --sms must not need one, GPU machine or not.
    run = subprocess.run([str(binary), "--plan", "--sms", "132"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split() for line in run.stdout.splitlines()]
    planned = {tuple(r[:4]) for r in rows if len(r) > 4 and r[2] in ("float32", "bfloat16")}
    expected = set()
    for case in kernels.select_cases([], "default", "cuda"):
        for dtype in ("float32", "bfloat16"):
            # 2-D input (spatial size 1) is read channels-last only.
            for layout in ("nchw", "channels_last") if len(case.shape) > 2 else ("channels_last",):
                expected.add((case.name, case.shape_str, dtype, layout))
    assert planned >= expected, f"no plan printed for {sorted(expected - planned)}:\n{run.stdout}"
    assert {p[0] for p in planned} <= {e[0] for e in expected}, "the harness has default cases kernels.py lacks"
