"""Compile every CUDA source without a GPU, and check what can be checked on
the host: the commands and the background build are in tests/cuda_build.py
(kernels torch-free for compute_90, op files against the CPU wheel's torch
headers, the timing harness from the kernel objects).

* The kernels' 32-bit index divider (csrc/cuda/divider.h) is host-callable:
  tests/native/divider_check.cpp checks it against integer division.
* The harness's --plan mode runs without a GPU.

These tests run last in the suite; the conftest starts the build at
collection, so it overlaps the rest. Each case reports its own file's result.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

from benchmarks import kernels
from tests import cuda_build
from tests.cuda_build import CSRC, CUDA_DIR, HARNESS_BUILD, KERNELS, NVCC, NVCC_FLAGS, OP_FILES

DIVIDER_CHECK = Path(__file__).resolve().parent / "native" / "divider_check.cpp"

pytestmark = [pytest.mark.cuda_compile, pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")]


@pytest.fixture(scope="module")
def compiled():
    start = time.perf_counter()
    results = {s: f.result() for s, f in cuda_build.start().objects.items()}
    print(f"\ncompiled {len(results)} CUDA files (waited {time.perf_counter() - start:.1f}s for them here)")
    return results


@pytest.fixture(scope="module")
def harness(compiled):
    """(binary, returncode, log, seconds) of build.sh linking the kernel objects
    compiled above: one extra nvcc compile, harness.cu's."""
    return cuda_build.start().harness.result()


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
    # build.sh compiles the kernels with kernel_command's NVCC_FLAGS, -std and -O3 (then to sm_90 machine code), without torch.
    script = HARNESS_BUILD.read_text()
    for flag in [*NVCC_FLAGS, f"-std={cuda_build.cxx_standard()}", "-O3", "ARCH=90"]:
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
