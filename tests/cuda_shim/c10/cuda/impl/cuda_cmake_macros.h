// Test-only shim: the one generated header a CUDA build of torch ships and the
// CPU wheel lacks. Lets tests/cuda_build.py run nvcc against the CPU
// wheel's headers. Never on the include path of a real build.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
