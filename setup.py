"""Build bnfast._C with torch.utils.cpp_extension (ninja).

Knobs (printed at build time):
  BNFAST_FORCE_CUDA=1      build the CUDA kernels even when torch has no CUDA
                           (needs nvcc); by default they are built when torch
                           has CUDA and nvcc is found.
  BNFAST_CPU_ISA=...       comma list of instruction sets to build the CPU
                           loops for, from DEFAULT,AVX2,AVX512 (x86-64 default:
                           all three; elsewhere: DEFAULT). DEFAULT is always built.
  BNFAST_DEBUG=1           -O0 -g instead of -O3.
  TORCH_CUDA_ARCH_LIST     torch's own knob; default here "8.0;9.0+PTX".
  MAX_JOBS                 torch's own knob: parallel compile jobs.
"""

import glob
import os
import platform

from packaging.version import Version
from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

MIN_TORCH = "2.6"
HERE = os.path.dirname(os.path.abspath(__file__))

if Version(torch.__version__).release < Version(MIN_TORCH).release:
    raise RuntimeError(f"bnfast needs torch>={MIN_TORCH}, found {torch.__version__}")

# The CPU loops (csrc/cpu/isa/loops.cpp) are compiled once per instruction set
# and picked at run time (csrc/cpu/dispatch.cpp); everything else is built for
# the x86-64 baseline, so the library loads on any x86-64 CPU.
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c", "-DCPU_CAPABILITY_AVX512"],
}
ISA_SOURCE = os.path.join("csrc", "cpu", "isa", "loops.cpp")


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def selected_isas():
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    requested = os.environ.get("BNFAST_CPU_ISA", "DEFAULT,AVX2,AVX512" if x86 else "DEFAULT")
    isas = [s.strip().upper() for s in requested.split(",") if s.strip()]
    unknown = sorted(set(isas) - set(ISA_FLAGS))
    if unknown:
        raise ValueError(f"BNFAST_CPU_ISA: unknown instruction sets {unknown}; choose from {list(ISA_FLAGS)}")
    if not x86 and set(isas) - {"DEFAULT"}:
        raise ValueError(f"BNFAST_CPU_ISA: {isas} need an x86-64 machine, this is {platform.machine()}")
    return ["DEFAULT"] + [isa for isa in ("AVX2", "AVX512") if isa in isas]


def use_cuda():
    if env_flag("BNFAST_FORCE_CUDA"):
        if CUDA_HOME is None:
            raise RuntimeError("BNFAST_FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found")
        return True
    return torch.cuda.is_available() or (torch.version.cuda is not None and CUDA_HOME is not None)


class BuildWithISAs(BuildExtension):
    """BuildExtension that first compiles the ISA-specific loops, each with its
    own flags (cpp_extension has no per-file flags), and links them in."""

    def build_extension(self, ext):
        base_flags = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
        for isa in ISAS:
            objects = self.compiler.compile(
                [ISA_SOURCE],
                output_dir=os.path.join(self.build_temp, f"isa_{isa}"),
                include_dirs=ext.include_dirs,
                extra_postargs=list(base_flags) + [f"-DCPU_CAPABILITY={isa}"] + ISA_FLAGS[isa],
            )
            ext.extra_objects.extend(objects)
        super().build_extension(ext)


def make_extension():
    isas = selected_isas()
    cuda = use_cuda()
    debug = env_flag("BNFAST_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/autograd/*.cpp")
                     + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp at compile time only: at::parallel_for is inline and runs
    # serially without it; the GOMP symbols resolve at load time to the OpenMP
    # runtime libtorch_cpu already links (torch's own, so torch.set_num_threads
    # governs bnfast's threads too). Linking another libgomp would split them.
    # -fno-math-errno, as torch builds ATen: std::sqrt in the per-channel
    # loops (invstd from the running variance) inlines and vectorizes; the
    # results are the same, only errno goes unset.
    # -ffp-contract=off: by default GCC fuses a * b + c into one FMA wherever
    # the inlined code allows it, so two inlined copies of one formula (an
    # activation's derivative in two loops) could round differently, and a
    # result would depend on the loop, i.e. on the shape or thread count, that
    # computed it. The kernels' explicit fmadd calls stay FMAs (AVX2, AVX-512).
    cxx = opt + ["-fopenmp", "-fno-math-errno", "-ffp-contract=off"] + [
        f"-DBNFAST_HAVE_{isa}" for isa in isas if isa != "DEFAULT"]
    extra = {"cxx": cxx}
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        # The op files (*.cpp, host compiler: checks, allocation, launches) and
        # their kernels (*.cu, nvcc, torch-free; see csrc/cuda/launch.h).
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = opt + ["-lineinfo"]
    print(f"bnfast build: torch {torch.__version__}, CUDA kernels {'on' if cuda else 'off'}"
          f"{' (TORCH_CUDA_ARCH_LIST=' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if cuda else ''}, "
          f"CPU instruction sets {','.join(isas)}, {'debug' if debug else 'release'}")
    cls = CUDAExtension if cuda else CppExtension
    return cls("bnfast._C", sources, extra_compile_args=extra, include_dirs=[os.path.join(HERE, "csrc")]), isas


extension, ISAS = make_extension()
setup(
    name="bnfast",
    packages=find_packages(include=["bnfast", "bnfast.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildWithISAs.with_options(use_ninja=True)},
)
