// Picks the loop table for this CPU (see loops.h). Instruction-set policy:
// csrc/cpu/isa/loops.cpp is built for DEFAULT (the x86-64 baseline every CPU
// runs), AVX2 (+FMA, F16C) and AVX-512 (F, BW, VL, DQ); every other file is
// built for the baseline. At run time we follow ATen's own choice of kernels,
// at::get_cpu_capability() (also what torch.backends.cpu.get_cpu_capability()
// reports): it checks the CPU (cpuinfo) and honours
// ATEN_CPU_CAPABILITY=default|avx2|avx512, so bnfast never runs an
// instruction the CPU lacks and a user who caps torch caps bnfast too.
#include <ATen/Version.h>

#include <string>

#include "loops.h"

namespace bnfast {
namespace cpu {

const LoopTable& loop_table() {
  static const LoopTable& table = []() -> const LoopTable& {
    // "DEFAULT", "AVX2" or "AVX512" on x86-64 (other names elsewhere).
    const std::string capability = at::get_cpu_capability();
    (void)capability;
#ifdef BNFAST_HAVE_AVX512
    if (capability == "AVX512") return loop_table_AVX512();
#endif
#ifdef BNFAST_HAVE_AVX2
    if (capability == "AVX512" || capability == "AVX2") return loop_table_AVX2();
#endif
    return loop_table_DEFAULT();
  }();
  return table;
}

}  // namespace cpu
}  // namespace bnfast
