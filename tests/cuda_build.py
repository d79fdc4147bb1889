"""Compiling bnfast's CUDA sources without a GPU: the commands and a
background build, shared by the suite's conftest (which starts it at
collection) and tests/test_cuda_compile.py (which checks the results).

* The kernels (csrc/cuda/*.cu) are compiled by nvcc for compute_90 with no torch
  include path at all: they must stay torch-free (csrc/cuda/launch.h says
  why), and this is what keeps them so.
* The CUDA op files (csrc/cuda/*.cpp: checks, allocation, launches) are
  compiled by the host compiler through nvcc (which adds the CUDA include
  path), against the CPU wheel's torch headers. The wheel lacks one generated
  header, c10/cuda/impl/cuda_cmake_macros.h; tests/cuda_shim provides it
  (test-only).
* The standalone timing harness (benchmarks/cuda_harness) links the kernel
  objects compiled here. They carry PTX, not sm_90 machine code
  (kernel_command says why).

Everything compiles once, in parallel (one process per core), at the lowest
CPU priority: started at collection, the compilers fill the cores the other
tests leave idle.
"""

import concurrent.futures
import functools
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
SHIM = Path(__file__).resolve().parent / "cuda_shim"
KERNELS = sorted(CUDA_DIR.glob("*.cu"))
OP_FILES = sorted(CUDA_DIR.glob("*.cpp"))
HARNESS_BUILD = ROOT / "benchmarks" / "cuda_harness" / "build.sh"
NVCC = shutil.which("nvcc")
# nice(1): the compilers take only the CPU time the other tests leave.
LOW_PRIORITY = ["nice", "-n", "19"] if shutil.which("nice") else []


@functools.cache
def cxx_standard():
    # Whatever this torch's CUDAExtension passes to nvcc (c++20 from torch 2.10 on).
    return "c++20" if "'-std=c++20'" in inspect.getsource(cpp_extension) else "c++17"


# The defines CUDAExtension gives nvcc; the kernels must build under them.
NVCC_FLAGS = getattr(cpp_extension, "COMMON_NVCC_FLAGS", [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr"])


def kernel_command(source, output):
    """nvcc for a kernel file: csrc only on the include path (no torch). The
    object carries compute_90 PTX, all that the checks here need (the
    compile itself, the harness's link and its --plan run). ptxas, which
    turns PTX into sm_90 machine code, costs more than compiling to PTX and
    runs in the GPU machine's builds (setup.py, build.sh): what only it
    reports (shared memory or registers past a limit) surfaces there."""
    return [NVCC, "-c", str(source), "-o", str(output), f"-I{CSRC}", f"-std={cxx_standard()}",
            "-gencode", "arch=compute_90,code=compute_90", *NVCC_FLAGS, "-O3", "-Xcompiler", "-fPIC"]


def op_file_command(source, output, header=None, precompile=False):
    """The host compiler (via nvcc, for the CUDA include path) for an op file,
    with torch's headers as system headers (-Wall is for ours). header: a
    precompiled header to include first; precompile: compile source, a header,
    into output (its .gch)."""
    includes = [f"-I{SHIM}", f"-I{CSRC}"] + [a for p in cpp_extension.include_paths() for a in ("-isystem", p)]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    host_flags = "-fPIC,-Wall"
    if precompile:
        host_flags += ",-x,c++-header"
    if header is not None:
        host_flags += f",-include,{header},-Winvalid-pch"
    return [NVCC, "-x", "c++", "-c", str(source), "-o", str(output), *includes, f"-std={cxx_standard()}",
            "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            "-Xcompiler", host_flags]


def op_files_header_text():
    """The headers every op file starts with: torch/library.h, then ops.h's
    own system headers. Precompiled once, they spare each op file parsing
    torch's headers again."""
    ops_h = (CUDA_DIR / "ops.h").read_text()
    return "".join(f"#include {h}\n" for h in ["<torch/library.h>", *re.findall(r"^#include (<[^>]+>)", ops_h, re.M)])


# A process group of its own, so stopping a command stops its children too;
# not a session of its own: with the kernel's autogroup scheduling, a new
# session would share the CPU equally with the tests, whatever its nice value.
OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {}


def run(command, started):
    """(returncode, output, seconds) of a command; started(process) is called
    once it runs."""
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **OWN_GROUP) as proc:
        started(proc)
        output, _ = proc.communicate()
    return proc.returncode, output, time.perf_counter() - start


class Build:
    """Every CUDA file, then the harness, compiling in the background into a
    temporary folder: `objects` {source: future of (returncode, output,
    seconds)}, `harness` future of (binary, returncode, output, seconds)."""

    def __init__(self):
        header_text = op_files_header_text()  # what can fail runs before the folder and the pool exist
        self.folder = Path(tempfile.mkdtemp(prefix="bnfast-cuda-objects-"))
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._running = set()  # processes started and not yet stopped by close()
        self._closed = False
        header = self.folder / "op_files.h"
        header.write_text(header_text)
        self.header = self._pool.submit(self._run, op_file_command(header, f"{header}.gch", precompile=True))
        self.objects = {s: self._pool.submit(self._run, kernel_command(s, self.folder / (s.stem + ".o")))
                        for s in KERNELS}
        # Each waits for the header's job, queued first (and so, as a rule, done by then).
        self.objects.update({s: self._pool.submit(self._compile_op_file, s, header) for s in OP_FILES})
        # Submitted last, so every kernel job has left the queue before it
        # waits on them: it cannot hold up a worker they need.
        self.harness = self._pool.submit(self._build_harness)

    def _compile_op_file(self, source, header):
        returncode, output, seconds = self.header.result()
        if returncode != 0:
            return returncode, f"precompiling the op files' header failed:\n{output}", seconds
        return self._run(op_file_command(source, self.folder / (source.stem + ".op.o"), header))

    def _build_harness(self):
        concurrent.futures.wait([self.objects[s] for s in KERNELS])
        binary = self.folder / "bnfast_harness"
        returncode, output, seconds = self._run(["bash", str(HARNESS_BUILD), "--objects", str(self.folder),
                                                 "-o", str(binary)])
        return binary, returncode, output, seconds

    def _run(self, command):
        def started(proc):
            with self._lock:
                self._running.add(proc)
                if self._closed:
                    _stop(proc)

        try:
            return run(LOW_PRIORITY + command, started)
        finally:
            with self._lock:
                self._running = {p for p in self._running if p.poll() is None}

    def close(self):
        """Drop what has not started, stop what has (a session that ends
        early, e.g. pytest -x, does not wait for the compilers; before Python
        3.11, which cannot give a command a process group of its own, it
        waits for the running ones), remove the folder."""
        with self._lock:
            self._closed = True
            for proc in self._running:
                _stop(proc)
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def _stop(proc):
    """SIGTERM to proc's process group (OWN_GROUP), unless proc was reaped
    (its pid may name another process by now)."""
    if OWN_GROUP and proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


_build = None


def start():
    """The one background build of this process, started on first call."""
    global _build
    if _build is None:
        _build = Build()
    return _build


def stop():
    global _build
    if _build is not None:
        _build.close()
        _build = None
