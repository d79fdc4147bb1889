// bnfast_harness: bnfast's CUDA kernels timed and checked without torch
// (issue #10). build.sh compiles it with the kernel files (csrc/cuda/*.cu)
// for sm_90 on any machine with nvcc, GPU or not; the binary runs on the GPU
// machine in seconds.
//
//   bnfast_harness                  time every launcher of kOps on every case x
//                                   dtype x layout: a table, and --json FILE
//   bnfast_harness --check          every launcher against a float64 host
//                                   reference on small shapes, run twice for
//                                   bitwise run-to-run equality
//   bnfast_harness --sweep          the launchers over a grid of reduce and
//                                   elementwise block counts; the best per case
//   bnfast_harness --plan --sms 132 the plan of every case; touches no GPU
//
// Plan overrides (--reduce-blocks, --elementwise-blocks, --vec 1, --sms) apply
// in every mode, so a launch configuration is checked, timed and printed alike.
// A new kernel variant is a launcher (csrc/cuda/launch.h) and one line of kOps.
//
// Timing: `batch` back-to-back launches captured in a CUDA graph, its replays
// timed with events (no host launch gaps), the median per launch over
// `samples` replays. A tensor that fits in L2 stays there between launches, as
// in benchmarks/kernels.py, unless --flush-l2 (then each launch is timed alone
// after a write over twice the L2). Bandwidth follows DESIGN.md's streaming
// model (passes over the N*s-byte tensor: stats 1, elemt 2, forward 3,
// backward_reduce 2, backward_elemt 3, backward 5, copy 2; the fused
// activations' as forward's and backward's, plus 1 (forward) or 3 (backward)
// with a residual); "% copy" is that
// bandwidth over the bandwidth of a device-to-device copy of the same tensor.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "cuda/device.cuh"

namespace {

using namespace bnfast;
using namespace bnfast::cuda;

constexpr double kEps = 1e-5;

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "bnfast_harness: %s\n", message.c_str());
  std::exit(1);
}

void check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) die(what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

// ---------------------------------------------------------------------------
// Cases, dtypes, layouts

struct Case {
  std::string name;
  std::vector<int64_t> dims;  // (N, C, *)
  Shape shape() const {
    Shape s{dims[0], dims[1], 1};
    for (size_t d = 2; d < dims.size(); ++d) s.spatial *= dims[d];
    return s;
  }
  std::string dims_text() const {
    std::string t;
    for (int64_t d : dims) t += (t.empty() ? "" : "x") + std::to_string(d);
    return t;
  }
};

// benchmarks/kernels.py's default list on a GPU (select_cases([], "default",
// "cuda")), the ~100 MB ResNet-50 stem and first stage included;
// tests/test_cuda_compile.py checks that the two lists agree.
const std::vector<Case> kDefaultCases = {
    {"seed_bn1", {128, 32, 30, 30}}, {"seed_bn2", {128, 64, 13, 13}},  {"seed_bn3", {128, 64, 4, 4}},
    {"r18_s1", {128, 64, 32, 32}},   {"r18_s2", {128, 128, 16, 16}},   {"r18_s3", {128, 256, 8, 8}},
    {"r18_s4", {128, 512, 4, 4}},    {"r50_stem", {32, 64, 112, 112}}, {"r50_s1", {32, 256, 56, 56}},
    {"r50_s2", {32, 512, 28, 28}},   {"r50_s3", {32, 1024, 14, 14}},   {"mlp", {256, 4096}},
    {"video", {8, 64, 8, 28, 28}},
};

// --check's shapes: every code path of make_plan, small enough for a host
// reference. Odd sizes (no 16-byte vectors either layout, bx > C), vectors
// in both layouts, many reduce / elementwise blocks per channel (M = 65536),
// 2-D (read channels-last), 5-D, and channels-last with several x tiles.
const std::vector<Case> kCheckCases = {
    {"odd", {3, 5, 7, 9}},        {"vec", {8, 16, 8, 8}},   {"long", {64, 4, 32, 32}},
    {"2d", {16, 100}},            {"5d", {2, 72, 3, 5, 5}}, {"ctiles", {16, 320, 7, 7}},
};

struct DTypeInfo {
  const char* name;
  DType dtype;
  double tolerance;  // --check: max |error| / max |reference| of an output tensor
};
// Weight and bias are float32 for every dtype, as under autocast; the
// per-channel statistics are float (the accumulation dtype of all three).
// Tolerances: float arithmetic, then rounding to the output dtype.
const DTypeInfo kDTypes[] = {
    {"float32", DType::kFloat, 2e-5},
    {"bfloat16", DType::kBFloat16, 1e-2},
    {"float16", DType::kHalf, 2e-3},
};
// --check: per-channel outputs (float sums over up to 65536 elements).
constexpr double kChannelTolerance = 1e-4;

const char* layout_name(Layout l) { return l == Layout::kChannelsFirst ? "nchw" : "channels_last"; }

// ---------------------------------------------------------------------------
// Options

enum class Mode { kTime, kCheck, kSweep, kPlan };

struct Options {
  Mode mode = Mode::kTime;
  std::vector<Case> cases;        // --cases: replaces the mode's default list
  std::vector<Case> extra_cases;  // --case: added to it
  bool cases_given = false;
  std::vector<const DTypeInfo*> dtypes;
  std::vector<Layout> layouts = {Layout::kChannelsFirst, Layout::kChannelsLast};
  std::vector<std::string> ops;  // empty: all of kOps
  int sms = 0;                   // 0: the device's
  int64_t reduce_blocks = 0;     // 0: the plan's
  int64_t elementwise_blocks = 0;
  bool vec1 = false;
  int samples = 0;  // 0: the mode's default
  int batch = 0;
  bool graph = true;
  bool flush_l2 = false;
  std::string json;
};

const char* kUsage = R"(usage: bnfast_harness [--plan | --check | --sweep] [options]

modes (default: time every launcher on every case)
  --plan                 print each case's plan and exit; with --sms, no GPU is touched
  --check                compare every launcher with a float64 host reference on
                         small shapes (the --check cases), twice for bitwise equality
  --sweep                time the launchers over reduce x elementwise block counts

selection
  --cases LIST           comma list of default case names and/or shapes (NxCxHxW)
                         instead of the mode's list
  --case SHAPE           add a shape (repeatable), e.g. --case 64x32x16x16
  --dtypes LIST          float32,bfloat16 (default), float16
  --layouts LIST         nchw,channels_last (default both; 2-D input is channels_last)
  --ops LIST             launchers to run (default all): )";

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "bnfast_harness: %s (--help for usage)\n", message.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& text, char sep = ',') {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t end = std::min(text.find(sep, start), text.size());
    if (end > start) out.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

int64_t parse_int(const std::string& text, const std::string& flag, int64_t lo, int64_t hi) {
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || v < lo || v > hi) {
    usage_error(flag + " needs an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" +
                text + "'");
  }
  return v;
}

Case parse_case(const std::string& text) {
  for (const Case& c : kDefaultCases) {
    if (c.name == text) return c;
  }
  Case c{text, {}};
  for (const std::string& d : split(text, 'x')) c.dims.push_back(parse_int(d, "a shape's size", 1, int64_t(1) << 40));
  if (c.dims.size() < 2) usage_error("'" + text + "' is neither a case name nor a shape NxC[xHxW...]");
  return c;
}

// ---------------------------------------------------------------------------
// Plans

// The plan an op gets for this input, with the overrides applied. Every
// buffer is cudaMalloc'd (256-byte aligned), so aligned = true, except that
// --vec 1 asks for what an op with an unaligned tensor gets (make_plan then
// also sizes the block for one element per access).
Plan plan_for(const Options& o, DType dtype, Layout layout, const Shape& shape, int sms) {
  Plan p = make_plan(dtype, layout, shape, /*aligned=*/!o.vec1, sms);
  if (o.reduce_blocks > 0) p.reduce_blocks = o.reduce_blocks;
  if (o.elementwise_blocks > 0) p.elementwise_blocks = o.elementwise_blocks;
  return p;
}

std::string plan_brief(const Plan& p) {
  char b[64];
  std::snprintf(b, sizeof b, "v%d %dx%d P%lld E%lld", p.vec, p.bx, p.by, static_cast<long long>(p.reduce_blocks),
                static_cast<long long>(p.elementwise_blocks));
  return b;
}

// Accesses (of p.vec elements) per thread along a channel for `blocks` blocks along y.
int64_t accesses_per_thread(const Plan& p, int64_t blocks) {
  const int64_t units = p.layout == Layout::kChannelsFirst ? p.M / p.vec : p.M;
  return ceil_div(units, static_cast<int64_t>(p.by) * blocks);
}

// Bytes every block of the fused ops' elementwise kernel reads back from the
// reduce kernel's partials, summed over the grid: each of its E blocks along
// a channel merges all P partials of its channels.
int64_t merge_bytes(const Plan& p, Reduction r, DType dtype) {
  return p.elementwise_blocks * static_cast<int64_t>(scratch_bytes(p, dtype, r));
}

// ---------------------------------------------------------------------------
// Minimal JSON: numbers, plain strings, objects and arrays as text.

std::string jnum(double v) {
  if (!std::isfinite(v)) return "null";
  char b[32];
  // Counts (bytes, block numbers) exactly, measurements to 6 digits.
  std::snprintf(b, sizeof b, v == std::floor(v) && std::fabs(v) < 1e15 ? "%.0f" : "%.6g", v);
  return b;
}
std::string jstr(const std::string& s) { return "\"" + s + "\""; }

class JsonObject {
 public:
  JsonObject& num(const char* key, double v) { return raw(key, jnum(v)); }
  JsonObject& str(const char* key, const std::string& v) { return raw(key, jstr(v)); }
  JsonObject& boolean(const char* key, bool v) { return raw(key, v ? "true" : "false"); }
  JsonObject& raw(const char* key, const std::string& json) {
    body_ += (body_.empty() ? "" : ", ") + jstr(key) + ": " + json;
    return *this;
  }
  std::string text() const { return "{" + body_ + "}"; }

 private:
  std::string body_;
};

std::string json_array(const std::vector<std::string>& items) {
  std::string t;
  for (const std::string& i : items) t += (t.empty() ? "" : ", ") + i;
  return "[" + t + "]";
}

std::string plan_json(const Plan& p) {
  return JsonObject()
      .num("vec", p.vec)
      .boolean("index32", p.index32)
      .num("bx", p.bx)
      .num("by", p.by)
      .num("ctiles", static_cast<double>(p.ctiles))
      .num("reduce_blocks", static_cast<double>(p.reduce_blocks))
      .num("elementwise_blocks", static_cast<double>(p.elementwise_blocks))
      .text();
}

std::string config_json(const Case& c, const DTypeInfo& t, Layout l, const Plan& p) {
  std::vector<std::string> dims;
  for (int64_t d : c.dims) dims.push_back(jnum(static_cast<double>(d)));
  return JsonObject()
      .str("case", c.name)
      .raw("shape", json_array(dims))
      .str("dtype", t.name)
      .str("layout", layout_name(l))
      .num("bytes", static_cast<double>(c.shape().numel() * dtype_bytes(t.dtype)))
      .raw("plan", plan_json(p))
      .text();
}

void write_json(const std::string& path, const std::string& text) {
  if (path.empty()) return;
  std::ofstream f(path);
  f << text << "\n";
  if (!f) die("cannot write " + path);
  std::printf("wrote %s\n", path.c_str());
}

// ---------------------------------------------------------------------------
// Device data

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) { reserve(bytes); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr_); }
  // At least `bytes`, contents not kept.
  void reserve(size_t bytes) {
    if (bytes <= bytes_) return;
    cudaFree(ptr_);
    ptr_ = nullptr;
    check(cudaMalloc(&ptr_, bytes), "cudaMalloc(" + std::to_string(bytes) + ")");
    bytes_ = bytes;
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Deterministic test values, base + step * level(c) + scale * u with u
// uniform in [-1, 1) from a hash of the index; level(c) in [-4, 4] gives the
// channels different means.
struct Fill {
  uint32_t seed;
  float base, step, scale;
};

__device__ uint32_t mix(uint32_t h) {  // lowbias32 (Chris Wellons' hash prospector)
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

// Element i of a (C, S) channel structure: channel i % C (channels-last) or
// (i / S) % C; S = 1 and C = n for a [C] vector.
template <typename T>
__global__ void fill_kernel(T* p, int64_t n, int64_t C, int64_t S, bool channels_last, Fill f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channels_last ? i % C : (i / S) % C;
    const uint32_t h = mix(static_cast<uint32_t>(i) ^ mix(static_cast<uint32_t>(i >> 32) + f.seed * 0x9e3779b9u));
    const float u = static_cast<float>(h >> 8) * (2.0f / 16777216.0f) - 1.0f;
    p[i] = narrow<T>(f.base + f.step * static_cast<float>((c * 7) % 9 - 4) + f.scale * u);
  }
}

void fill(DType dtype, void* p, int64_t n, int64_t C, int64_t S, Layout layout, Fill f, cudaStream_t s) {
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 4096));
  const bool cl = layout == Layout::kChannelsLast;
  check(dispatch(dtype,
                 [&](auto tag) {
                   using T = typename decltype(tag)::type;
                   fill_kernel<T><<<blocks, 256, 0, s>>>(static_cast<T*>(p), n, C, S, cl, f);
                   return cudaGetLastError();
                 }),
        "fill");
}

// What a launcher reads and writes: one configuration's buffers.
struct Run {
  DType dtype;
  Plan plan;
  size_t bytes;  // of one tensor
  const void* x;
  void* y;
  const void* dy;
  void* dx;
  Param weight, bias;
  void* mean;  // written by stats and forward, read by the others
  void* invstd;
  const void* mean_dy;
  const void* mean_dy_xmu;
  void* sum_dy;
  void* sum_dy_xmu;
  void* grad_weight;
  void* grad_bias;
  void* scratch;
  const void* residual;  // the fused launchers' (x's layout and dtype)
  void* grad_residual;
};

// The per-channel [C] float buffers, by role.
enum Channel { kWeight, kBias, kMean, kInvstd, kMeanDy, kMeanDyXmu, kSumDy, kSumDyXmu, kGradWeight, kGradBias, kChannels };

struct Config {
  const Case& c;
  const DTypeInfo& t;
  Layout layout;
  Plan plan;
};

// The buffers of one configuration. Inputs get their test values from init();
// scratch grows to fit plans with more reduce blocks (--sweep).
class Tensors {
 public:
  Tensors(const Config& cfg, cudaStream_t stream)
      : cfg_(cfg), stream_(stream), shape_(cfg.c.shape()),
        bytes_(static_cast<size_t>(shape_.numel() * dtype_bytes(cfg.t.dtype))),
        x_(bytes_), y_(bytes_), dy_(bytes_), dx_(bytes_), residual_(bytes_), grad_residual_(bytes_) {
    for (DeviceBuffer& b : channels_) b.reserve(static_cast<size_t>(shape_.channels) * sizeof(float));
  }

  void init() {
    const int64_t n = shape_.numel(), C = shape_.channels, S = shape_.spatial;
    fill(cfg_.t.dtype, x_.get(), n, C, S, cfg_.layout, {1, 0.0f, 1.0f, 1.0f}, stream_);
    fill(cfg_.t.dtype, dy_.get(), n, C, S, cfg_.layout, {2, 0.0f, 0.1f, 1.0f}, stream_);
    fill(cfg_.t.dtype, residual_.get(), n, C, S, cfg_.layout, {9, 0.0f, 0.2f, 1.0f}, stream_);
    // mean and invstd near the statistics of x (invstd ~ 1 / 0.577), mean
    // offset by 0.5 and dy by channel so that the sums of dy and of
    // dy * (x - mean) do not cancel (--check compares them to max |sum|).
    const Fill channel_fills[] = {{3, 1.0f, 0.1f, 0.25f}, {4, 0.0f, 0.25f, 0.5f}, {5, 0.5f, 1.0f, 0.1f},
                                  {6, 1.5f, 0.0f, 0.25f}, {7, 0.0f, 0.05f, 0.01f}, {8, 0.0f, 0.0f, 0.1f}};
    for (int k = kWeight; k <= kMeanDyXmu; ++k) {
      fill(DType::kFloat, channels_[k].get(), C, C, 1, Layout::kChannelsLast, channel_fills[k], stream_);
    }
    check(cudaStreamSynchronize(stream_), "init");
  }

  Run run(const Plan& plan) {
    scratch_.reserve(std::max(scratch_bytes(plan, cfg_.t.dtype, Reduction::kStats),
                              scratch_bytes(plan, cfg_.t.dtype, Reduction::kGradSums)));
    auto ch = [&](Channel k) { return channels_[k].get(); };
    return {cfg_.t.dtype, plan, bytes_, x_.get(), y_.get(), dy_.get(), dx_.get(),
            Param{ch(kWeight), DType::kFloat}, Param{ch(kBias), DType::kFloat}, ch(kMean), ch(kInvstd),
            ch(kMeanDy), ch(kMeanDyXmu), ch(kSumDy), ch(kSumDyXmu), ch(kGradWeight), ch(kGradBias), scratch_.get(),
            residual_.get(), grad_residual_.get()};
  }

  const DeviceBuffer& x() const { return x_; }
  const DeviceBuffer& y() const { return y_; }
  const DeviceBuffer& dy() const { return dy_; }
  const DeviceBuffer& dx() const { return dx_; }
  const DeviceBuffer& residual() const { return residual_; }
  const DeviceBuffer& grad_residual() const { return grad_residual_; }
  const DeviceBuffer& channel(Channel k) const { return channels_[k]; }

 private:
  const Config& cfg_;
  cudaStream_t stream_;
  Shape shape_;
  size_t bytes_;
  DeviceBuffer x_, y_, dy_, dx_, residual_, grad_residual_, scratch_;
  DeviceBuffer channels_[kChannels];
};

// ---------------------------------------------------------------------------
// The launchers

// What a launcher computes: its streaming-model passes and, for --check, its
// outputs and their reference.
// kForwardAct / kBackwardAct: launch_forward_act / launch_backward_act with
// the op's Fusion.
enum class Kind { kCopy, kStats, kForward, kElemt, kBackwardReduce, kBackwardElemt, kBackward, kForwardAct, kBackwardAct };

// A fused launcher's activation (ActFusion without its buffers).
struct Fusion {
  Act act = Act::kIdentity;
  bool pre_relu = false;
  bool residual = false;
};
constexpr double kSlope = 0.01;  // leaky_relu's

ActFusion act_fusion(const Fusion& f, const Run& r) {
  ActFusion a;
  a.act = f.act;
  a.pre_relu = f.pre_relu;
  a.slope = kSlope;
  if (f.residual) {
    a.residual = r.residual;
    a.grad_residual = r.grad_residual;
  }
  return a;
}

// Tensor passes of the streaming model: a residual adds its read (forward)
// or two reads and grad_residual's write (backward).
int passes(Kind k, const Fusion& f = {}) {
  switch (k) {
    case Kind::kStats: return 1;
    case Kind::kCopy:
    case Kind::kElemt:
    case Kind::kBackwardReduce: return 2;
    case Kind::kForward:
    case Kind::kBackwardElemt: return 3;
    case Kind::kBackward: return 5;
    case Kind::kForwardAct: return 3 + f.residual;
    case Kind::kBackwardAct: return 5 + 3 * f.residual;
  }
  return 0;
}

// Which plan fields a launcher's grid follows (what --sweep varies).
enum Uses : unsigned { kUsesNone = 0, kUsesReduce = 1, kUsesElementwise = 2 };

struct Op {
  const char* name;
  const char* label;  // table column
  Kind kind;
  unsigned uses;
  cudaError_t (*launch)(const Run&, cudaStream_t);
  Fusion fusion;  // kForwardAct, kBackwardAct
};

constexpr Fusion kAddRelu{Act::kRelu, false, true}, kPreRelu{Act::kIdentity, true, false},
    kGeluResidual{Act::kGelu, false, true}, kLeakyRelu{Act::kLeakyRelu, false, false};

template <const Fusion& kFusion>
cudaError_t forward_act(const Run& r, cudaStream_t s) {
  return launch_forward_act(r.dtype, r.plan, r.x, r.y, r.weight, r.bias, r.mean, r.invstd, kEps,
                            act_fusion(kFusion, r), r.scratch, s);
}
template <const Fusion& kFusion>
cudaError_t backward_act(const Run& r, cudaStream_t s) {
  return launch_backward_act(r.dtype, r.plan, r.dy, r.x, r.dx, r.mean, r.invstd, r.weight, r.bias, r.grad_weight,
                             r.grad_bias, act_fusion(kFusion, r), r.scratch, s);
}

// One line per launcher timed; a new kernel variant is its launcher and a line here.
const Op kOps[] = {
    {"copy", "copy", Kind::kCopy, kUsesNone,
     [](const Run& r, cudaStream_t s) { return cudaMemcpyAsync(r.y, r.x, r.bytes, cudaMemcpyDeviceToDevice, s); }},
    {"stats", "stats", Kind::kStats, kUsesReduce,
     [](const Run& r, cudaStream_t s) { return launch_stats(r.dtype, r.plan, r.x, r.mean, r.invstd, kEps, r.scratch, s); }},
    {"forward", "forward", Kind::kForward, kUsesReduce | kUsesElementwise,
     [](const Run& r, cudaStream_t s) {
       return launch_forward(r.dtype, r.plan, r.x, r.y, r.weight, r.bias, r.mean, r.invstd, kEps, r.scratch, s);
     }},
    // The training forward as the op runs it with a module's float32
    // buffers: the running statistics updated in the elementwise kernel (the
    // backward sums' [C] buffers, in the stats dtype, stand in for them).
    {"forward_running", "fwd+running", Kind::kForward, kUsesReduce | kUsesElementwise,
     [](const Run& r, cudaStream_t s) {
       const RunningUpdate running{r.sum_dy, r.sum_dy_xmu, nullptr, 0.1, kEps, 1.0};
       return launch_forward(r.dtype, r.plan, r.x, r.y, r.weight, r.bias, r.mean, r.invstd, kEps, r.scratch, s,
                             &running);
     }},
    {"elemt", "elemt", Kind::kElemt, kUsesElementwise,
     [](const Run& r, cudaStream_t s) {
       return launch_elemt(r.dtype, r.plan, r.x, r.y, r.weight, r.bias, r.mean, r.invstd, s);
     }},
    {"backward_reduce", "bwd_reduce", Kind::kBackwardReduce, kUsesReduce,
     [](const Run& r, cudaStream_t s) {
       return launch_backward_reduce(r.dtype, r.plan, r.dy, r.x, r.mean, r.sum_dy, r.sum_dy_xmu, r.scratch, s);
     }},
    {"backward_elemt", "bwd_elemt", Kind::kBackwardElemt, kUsesElementwise,
     [](const Run& r, cudaStream_t s) {
       return launch_backward_elemt(r.dtype, r.plan, r.dy, r.x, r.dx, r.mean, r.invstd, r.weight, r.mean_dy,
                                    r.mean_dy_xmu, s);
     }},
    {"backward", "backward", Kind::kBackward, kUsesReduce | kUsesElementwise,
     [](const Run& r, cudaStream_t s) {
       return launch_backward(r.dtype, r.plan, r.dy, r.x, r.dx, r.mean, r.invstd, r.weight, r.grad_weight,
                              r.grad_bias, r.scratch, s);
     }},
    // The fused activations (issue #11): BN + add -> relu and relu -> BN, as
    // the fused benchmark times them, and two of the other activations.
    {"forward_add_relu", "fwd+add_relu", Kind::kForwardAct, kUsesReduce | kUsesElementwise, forward_act<kAddRelu>,
     kAddRelu},
    {"backward_add_relu", "bwd+add_relu", Kind::kBackwardAct, kUsesReduce | kUsesElementwise, backward_act<kAddRelu>,
     kAddRelu},
    {"forward_pre_relu", "fwd+pre_relu", Kind::kForwardAct, kUsesReduce | kUsesElementwise, forward_act<kPreRelu>,
     kPreRelu},
    {"backward_pre_relu", "bwd+pre_relu", Kind::kBackwardAct, kUsesReduce | kUsesElementwise,
     backward_act<kPreRelu>, kPreRelu},
    {"forward_leaky_relu", "fwd+leaky", Kind::kForwardAct, kUsesReduce | kUsesElementwise,
     forward_act<kLeakyRelu>, kLeakyRelu},
    {"backward_gelu_add", "bwd+gelu_add", Kind::kBackwardAct, kUsesReduce | kUsesElementwise,
     backward_act<kGeluResidual>, kGeluResidual},
};

std::vector<const Op*> selected_ops(const Options& o) {
  std::vector<const Op*> out;
  for (const Op& op : kOps) {
    if (o.ops.empty() || std::find(o.ops.begin(), o.ops.end(), op.name) != o.ops.end()) out.push_back(&op);
  }
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  std::vector<std::string> dtypes = {"float32", "bfloat16"};
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    const size_t eq = arg.find('=');
    const bool has_inline = arg.rfind("--", 0) == 0 && eq != std::string::npos;
    if (has_inline) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    auto next = [&]() -> std::string {
      if (has_inline) return value;
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    auto set_mode = [&](Mode m) {
      if (o.mode != Mode::kTime) usage_error("--plan, --check and --sweep exclude each other");
      o.mode = m;
    };
    if (arg == "-h" || arg == "--help") {
      std::printf("%s", kUsage);
      for (const Op& op : kOps) std::printf("%s%s", op.name, &op == std::end(kOps) - 1 ? "\n" : ",");
      std::printf(R"(
plan overrides (every mode)
  --sms N                multiprocessors the plan is made for (default: the device's)
  --reduce-blocks N      blocks along a channel of the reduce kernel (P)
  --elementwise-blocks N blocks along a channel of the elementwise kernel (E)
  --vec 1                one element per access (the plan of unaligned tensors)

timing
  --samples N            timed graph replays, median taken (default 21; sweep 7)
  --batch N              launches per replay (default 10; sweep 5)
  --no-graph             launch from the host (host launch gaps included)
  --flush-l2             time each launch alone after writing twice the L2 size
  --json FILE            also write the results as JSON
)");
      std::exit(0);
    } else if (arg == "--plan") {
      set_mode(Mode::kPlan);
    } else if (arg == "--check") {
      set_mode(Mode::kCheck);
    } else if (arg == "--sweep") {
      set_mode(Mode::kSweep);
    } else if (arg == "--cases") {
      o.cases_given = true;
      for (const std::string& c : split(next())) o.cases.push_back(parse_case(c));
    } else if (arg == "--case") {
      o.extra_cases.push_back(parse_case(next()));
    } else if (arg == "--dtypes") {
      dtypes = split(next());
    } else if (arg == "--layouts") {
      o.layouts.clear();
      for (const std::string& l : split(next())) {
        if (l == "nchw") o.layouts.push_back(Layout::kChannelsFirst);
        else if (l == "channels_last") o.layouts.push_back(Layout::kChannelsLast);
        else usage_error("unknown layout '" + l + "' (nchw, channels_last)");
      }
    } else if (arg == "--ops") {
      o.ops = split(next());
      for (const std::string& name : o.ops) {
        if (std::none_of(std::begin(kOps), std::end(kOps), [&](const Op& op) { return name == op.name; })) {
          usage_error("unknown op '" + name + "'");
        }
      }
    } else if (arg == "--sms") {
      o.sms = static_cast<int>(parse_int(next(), arg, 1, 100000));
    } else if (arg == "--reduce-blocks") {
      o.reduce_blocks = parse_int(next(), arg, 1, kMaxGridY);
    } else if (arg == "--elementwise-blocks") {
      o.elementwise_blocks = parse_int(next(), arg, 1, kMaxGridY);
    } else if (arg == "--vec") {
      parse_int(next(), "--vec (only 1: the widest vector is the plan's default)", 1, 1);
      o.vec1 = true;
    } else if (arg == "--samples") {
      o.samples = static_cast<int>(parse_int(next(), arg, 1, 100000));
    } else if (arg == "--batch") {
      o.batch = static_cast<int>(parse_int(next(), arg, 1, 100000));
    } else if (arg == "--no-graph") {
      o.graph = false;
    } else if (arg == "--flush-l2") {
      o.flush_l2 = true;
    } else if (arg == "--json") {
      o.json = next();
    } else {
      usage_error("unknown argument '" + arg + "'");
    }
  }
  for (const std::string& d : dtypes) {
    const auto* t = std::find_if(std::begin(kDTypes), std::end(kDTypes), [&](const DTypeInfo& i) { return d == i.name; });
    if (t == std::end(kDTypes)) usage_error("unknown dtype '" + d + "' (float32, bfloat16, float16)");
    o.dtypes.push_back(t);
  }
  if (!o.cases_given) o.cases = o.mode == Mode::kCheck ? kCheckCases : kDefaultCases;
  o.cases.insert(o.cases.end(), o.extra_cases.begin(), o.extra_cases.end());
  if (o.samples == 0) o.samples = o.mode == Mode::kSweep ? 7 : 21;
  if (o.batch == 0) o.batch = o.mode == Mode::kSweep ? 5 : 10;
  return o;
}

// f(case, dtype, layout) for every configuration. Inputs whose spatial size is
// 1 (2-D) are read channels-last only, as csrc/common/layout.h's layout_of does.
template <typename F>
void for_each_config(const Options& o, F&& f) {
  for (const Case& c : o.cases) {
    for (const DTypeInfo* t : o.dtypes) {
      for (Layout l : o.layouts) {
        if (c.shape().spatial == 1 && l == Layout::kChannelsFirst) continue;
        f(c, *t, l);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// --plan

int print_plans(const Options& o, int sms) {
  std::printf("plans for %d SMs (%d threads a block; partials merged by every elementwise block)\n", sms, kThreads);
  std::printf("%-9s %-16s %-8s %-13s %8s %3s %3s %6s %6s %5s %5s %6s %6s %5s %5s %5s %9s %9s\n", "case", "shape",
              "dtype", "layout", "MB", "vec", "i32", "block", "ctiles", "P", "E", "red/SM", "ew/SM", "r.acc", "e.acc",
              "rowB", "merge.fwd", "merge.bwd");
  std::vector<std::string> rows;
  for_each_config(o, [&](const Case& c, const DTypeInfo& t, Layout l) {
    const Plan p = plan_for(o, t.dtype, l, c.shape(), sms);
    const double mb = static_cast<double>(c.shape().numel() * dtype_bytes(t.dtype)) / 1e6;
    char block[16], row[16];
    std::snprintf(block, sizeof block, "%dx%d", p.bx, p.by);
    if (l == Layout::kChannelsLast) std::snprintf(row, sizeof row, "%lld", static_cast<long long>(p.bx * p.vec * dtype_bytes(t.dtype)));
    else std::snprintf(row, sizeof row, "-");
    const int64_t fwd_merge = merge_bytes(p, Reduction::kStats, t.dtype);
    const int64_t bwd_merge = merge_bytes(p, Reduction::kGradSums, t.dtype);
    std::printf("%-9s %-16s %-8s %-13s %8.2f %3d %3s %6s %6lld %5lld %5lld %6.1f %6.1f %5lld %5lld %5s %8.1fM %8.1fM\n",
                c.name.c_str(), c.dims_text().c_str(), t.name, layout_name(l), mb, p.vec, p.index32 ? "yes" : "no",
                block, static_cast<long long>(p.ctiles), static_cast<long long>(p.reduce_blocks),
                static_cast<long long>(p.elementwise_blocks), double(p.ctiles * p.reduce_blocks) / sms,
                double(p.ctiles * p.elementwise_blocks) / sms,
                static_cast<long long>(accesses_per_thread(p, p.reduce_blocks)),
                static_cast<long long>(accesses_per_thread(p, p.elementwise_blocks)), row, fwd_merge / 1e6,
                bwd_merge / 1e6);
    rows.push_back(JsonObject()
                       .raw("config", config_json(c, t, l, p))
                       .num("scratch_stats", static_cast<double>(scratch_bytes(p, t.dtype, Reduction::kStats)))
                       .num("scratch_grad", static_cast<double>(scratch_bytes(p, t.dtype, Reduction::kGradSums)))
                       .num("merge_bytes_forward", static_cast<double>(fwd_merge))
                       .num("merge_bytes_backward", static_cast<double>(bwd_merge))
                       .text());
  });
  std::printf(
      "red/SM, ew/SM: blocks of the reduce / elementwise grid per SM; r.acc, e.acc: accesses of vec elements per\n"
      "thread along a channel; rowB: bytes of one row a block's x threads cover (channels_last); merge: bytes the\n"
      "elementwise blocks of forward / backward read from the partials (E x P x C x 12 or 8 bytes)\n");
  write_json(o.json, JsonObject().str("mode", "plan").num("sms", sms).raw("rows", json_array(rows)).text());
  return 0;
}

// ---------------------------------------------------------------------------
// Timing

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

class Timer {
 public:
  Timer(const Options& o, cudaStream_t stream, size_t l2_bytes) : o_(o), stream_(stream) {
    if (o.flush_l2) flush_.reserve(2 * l2_bytes);
    events_.resize(2 * static_cast<size_t>(o.samples));
    for (cudaEvent_t& e : events_) check(cudaEventCreate(&e), "cudaEventCreate");
  }
  ~Timer() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }

  // Median microseconds per launch of op on run.
  double time(const Op& op, const Run& run, const std::string& what) {
    auto launch = [&] { check(op.launch(run, stream_), what); };
    launch();  // errors show here, outside any graph; the first launch loads the module
    check(cudaStreamSynchronize(stream_), what);
    int per_sample = o_.batch;
    cudaGraphExec_t exec = nullptr;
    if (o_.flush_l2) {
      per_sample = 1;
    } else if (o_.graph) {
      cudaGraph_t graph;
      check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), what + ": capture");
      for (int i = 0; i < o_.batch; ++i) launch();
      check(cudaStreamEndCapture(stream_, &graph), what + ": capture");
      check(cudaGraphInstantiate(&exec, graph, 0), what + ": instantiate");
      check(cudaGraphDestroy(graph), what);
    }
    auto sample = [&] {
      if (exec != nullptr) {
        check(cudaGraphLaunch(exec, stream_), what);
      } else {
        for (int i = 0; i < per_sample; ++i) launch();
      }
    };
    sample();  // warm-up
    for (int k = 0; k < o_.samples; ++k) {
      if (o_.flush_l2) check(cudaMemsetAsync(flush_.get(), k, flush_.bytes(), stream_), "flush");
      check(cudaEventRecord(events_[2 * k], stream_), what);
      sample();
      check(cudaEventRecord(events_[2 * k + 1], stream_), what);
    }
    check(cudaStreamSynchronize(stream_), what);
    if (exec != nullptr) check(cudaGraphExecDestroy(exec), what);
    std::vector<double> us(o_.samples);
    for (int k = 0; k < o_.samples; ++k) {
      float ms = 0;
      check(cudaEventElapsedTime(&ms, events_[2 * k], events_[2 * k + 1]), what);
      us[k] = 1e3 * ms / per_sample;
    }
    return median(us);
  }

 private:
  const Options& o_;
  cudaStream_t stream_;
  DeviceBuffer flush_;
  std::vector<cudaEvent_t> events_;
};

struct Device {
  cudaDeviceProp prop;
  int sms;  // the plans' (--sms, else the device's)
  cudaStream_t stream;
};

Device open_device(const Options& o) {
  Device d;
  check(cudaGetDeviceProperties(&d.prop, 0), "no usable CUDA device (--plan --sms N needs none)");
  d.sms = o.sms > 0 ? o.sms : d.prop.multiProcessorCount;
  check(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  std::printf("device: %s, sm_%d%d, %d SMs (plans for %d), L2 %.1f MB, %.0f KB shared memory per SM, "
              "driver %d, runtime %d\n",
              d.prop.name, d.prop.major, d.prop.minor, d.prop.multiProcessorCount, d.sms, d.prop.l2CacheSize / 1e6,
              d.prop.sharedMemPerMultiprocessor / 1024.0, driver, runtime);
  return d;
}

std::string device_json(const Device& d) {
  return JsonObject()
      .str("name", d.prop.name)
      .num("cc", d.prop.major * 10 + d.prop.minor)
      .num("sms", d.prop.multiProcessorCount)
      .num("plan_sms", d.sms)
      .num("l2_bytes", d.prop.l2CacheSize)
      .text();
}

// The JSON a device mode writes: its name, the device, then its own fields.
JsonObject mode_json(const char* mode, const Device& d) {
  JsonObject j;
  j.str("mode", mode).raw("device", device_json(d));
  return j;
}

// The device modes' loop: per configuration, its buffers with their test
// values, a table row that starts with the configuration and its plan and
// goes on with what f(cfg, tensors) prints, and the JSON object f returns
// (its per-launcher results). Returns the rows' JSON.
const char* const kRowHeader = "%-9s %-16s %-8s %-13s %7s %-18s";

template <typename F>
std::vector<std::string> on_each_config(const Options& o, const Device& d, F&& f) {
  std::vector<std::string> rows;
  for_each_config(o, [&](const Case& c, const DTypeInfo& t, Layout l) {
    const Config cfg{c, t, l, plan_for(o, t.dtype, l, c.shape(), d.sms)};
    Tensors data(cfg, d.stream);
    data.init();
    char mb[16];
    std::snprintf(mb, sizeof mb, "%.2f", c.shape().numel() * dtype_bytes(t.dtype) / 1e6);
    std::printf(kRowHeader, c.name.c_str(), c.dims_text().c_str(), t.name, layout_name(l), mb,
                plan_brief(cfg.plan).c_str());
    const std::string results = f(cfg, data);
    std::printf("\n");
    std::fflush(stdout);
    rows.push_back(JsonObject().raw("config", config_json(c, t, l, cfg.plan)).raw("ops", results).text());
  });
  return rows;
}

// A copy of 2 x 512 MiB (far beyond L2): the card's streaming bandwidth.
double dram_copy_tbs(Timer& timer) {
  const size_t bytes = size_t(512) << 20;
  DeviceBuffer a(bytes), b(bytes);
  Run r{};
  r.x = a.get();
  r.y = b.get();
  r.bytes = bytes;
  return 2.0 * bytes / (timer.time(kOps[0], r, "dram copy") * 1e-6) / 1e12;
}

int time_all(const Options& o, const Device& d) {
  const std::vector<const Op*> ops = selected_ops(o);
  const Op& copy = kOps[0];
  Timer timer(o, d.stream, d.prop.l2CacheSize);
  const double dram = dram_copy_tbs(timer);
  std::printf("copy of 512 MiB: %.2f TB/s (read + write); timing: %s, median of %d samples of %d launches\n", dram,
              o.flush_l2 ? "each launch alone after an L2 flush" : o.graph ? "CUDA graph replays" : "host launches",
              o.samples, o.flush_l2 ? 1 : o.batch);
  std::printf(kRowHeader, "case", "shape", "dtype", "layout", "MB", "plan");
  for (const Op* op : ops) std::printf(" %16s", (std::string(op->label) + " us %cp").c_str());
  std::printf("\n");
  const std::vector<std::string> rows = on_each_config(o, d, [&](const Config& cfg, Tensors& data) {
    const Run run = data.run(cfg.plan);
    const std::string where = cfg.c.name + " " + cfg.t.name + " " + layout_name(cfg.layout);
    const double copy_us = timer.time(copy, run, where + " copy");
    const double copy_bw = passes(Kind::kCopy) * double(run.bytes) / copy_us;  // bytes per us
    JsonObject results;
    for (const Op* op : ops) {
      const double us = op == &copy ? copy_us : timer.time(*op, run, where + " " + op->name);
      const double model = passes(op->kind, op->fusion) * double(run.bytes);
      std::printf(" %10.1f %4.0f%%", us, 100.0 * model / us / copy_bw);
      std::fflush(stdout);
      results.raw(op->name, JsonObject()
                                .num("us", us)
                                .num("model_bytes", model)
                                .num("tbs", model / us / 1e6)
                                .num("frac_copy", model / us / copy_bw)
                                .text());
    }
    return results.text();
  });
  std::printf("us: median time per launch; %%cp: streaming-model bandwidth (passes x tensor bytes / time) over the "
              "bandwidth of copying the same tensor\n");
  write_json(o.json, mode_json("time", d)
                         .num("dram_copy_tbs", dram)
                         .num("samples", o.samples)
                         .num("batch", o.batch)
                         .boolean("graph", o.graph)
                         .boolean("flush_l2", o.flush_l2)
                         .raw("rows", json_array(rows))
                         .text());
  return 0;
}

// ---------------------------------------------------------------------------
// --sweep

// Blocks along y tried for a plan's d: 1, d/2, d, 2d, and the counts that
// make the whole grid (ctiles columns) one wave of 2, 4 or 8 blocks per SM;
// make_plan rounds its fill target up, which can leave a second, near-empty
// wave (e.g. 64 channels x 17 = 1088 blocks for 132 x 8 = 1056 slots).
std::vector<int64_t> candidates(int64_t d, const Plan& p, int sms) {
  std::vector<int64_t> v = {1, d / 2, d, 2 * d};
  for (int64_t per_sm : {2, 4, 8}) v.push_back(sms * per_sm / p.ctiles);
  for (int64_t& x : v) x = std::clamp<int64_t>(x, 1, kMaxGridY);
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

int sweep(const Options& o, const Device& d) {
  std::vector<const Op*> ops;
  for (const Op* op : selected_ops(o)) {
    if (op->uses != kUsesNone) ops.push_back(op);
  }
  Timer timer(o, d.stream, d.prop.l2CacheSize);
  std::printf("sweep: P (reduce blocks) x E (elementwise blocks) in {1, d/2, d, 2d, one wave of 2, 4 or 8 blocks "
              "per SM} for the plan's d; best per launcher as speed-up over the plan (P, E)\n");
  std::printf(kRowHeader, "case", "shape", "dtype", "layout", "MB", "plan");
  for (const Op* op : ops) std::printf(" %22s", op->label);
  std::printf("\n");
  const std::vector<std::string> rows = on_each_config(o, d, [&](const Config& cfg, Tensors& data) {
    const Plan& plan = cfg.plan;
    const std::string where = cfg.c.name + " " + cfg.t.name + " " + layout_name(cfg.layout);
    JsonObject results;
    for (const Op* op : ops) {
      const bool reduce = op->uses & kUsesReduce, elementwise = op->uses & kUsesElementwise;
      const std::vector<int64_t> ps =
          reduce ? candidates(plan.reduce_blocks, plan, d.sms) : std::vector{plan.reduce_blocks};
      const std::vector<int64_t> es =
          elementwise ? candidates(plan.elementwise_blocks, plan, d.sms) : std::vector{plan.elementwise_blocks};
      double plan_us = 0, best_us = INFINITY;
      Plan best = plan;
      std::vector<std::string> points;
      for (int64_t p : ps) {
        for (int64_t e : es) {
          Plan variant = plan;
          variant.reduce_blocks = p;
          variant.elementwise_blocks = e;
          const double us = timer.time(*op, data.run(variant), where + " " + op->name + " " + plan_brief(variant));
          if (p == plan.reduce_blocks && e == plan.elementwise_blocks) plan_us = us;
          if (us < best_us) {
            best_us = us;
            best = variant;
          }
          points.push_back(JsonObject().num("P", double(p)).num("E", double(e)).num("us", us).text());
        }
      }
      char cell[64];
      std::snprintf(cell, sizeof cell, "%.2fx P%lld E%lld", plan_us / best_us, static_cast<long long>(best.reduce_blocks),
                    static_cast<long long>(best.elementwise_blocks));
      std::printf(" %22s", cell);
      std::fflush(stdout);
      results.raw(op->name, JsonObject()
                                .num("plan_us", plan_us)
                                .num("best_us", best_us)
                                .num("best_P", double(best.reduce_blocks))
                                .num("best_E", double(best.elementwise_blocks))
                                .raw("points", json_array(points))
                                .text());
    }
    return results.text();
  });
  write_json(o.json, mode_json("sweep", d)
                         .num("samples", o.samples)
                         .num("batch", o.batch)
                         .raw("rows", json_array(rows))
                         .text());
  return 0;
}

// ---------------------------------------------------------------------------
// --check

// The first n elements of a device buffer, as bytes.
std::vector<unsigned char> read_raw(const DeviceBuffer& b, DType dtype, int64_t n) {
  std::vector<unsigned char> raw(static_cast<size_t>(n * dtype_bytes(dtype)));
  check(cudaMemcpy(raw.data(), b.get(), raw.size(), cudaMemcpyDeviceToHost), "read back");
  return raw;
}

std::vector<double> widen(const std::vector<unsigned char>& raw, DType dtype) {
  const int64_t n = static_cast<int64_t>(raw.size()) / dtype_bytes(dtype);
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const unsigned char* p = raw.data() + i * dtype_bytes(dtype);
    switch (dtype) {
      case DType::kFloat: out[i] = *reinterpret_cast<const float*>(p); break;
      case DType::kBFloat16: out[i] = __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p)); break;
      case DType::kHalf: out[i] = __half2float(*reinterpret_cast<const __half*>(p)); break;
      case DType::kDouble: out[i] = *reinterpret_cast<const double*>(p); break;
    }
  }
  return out;
}

// An output a launcher writes: the y / dx tensor, or a [C] channel buffer.
enum Output { kY, kDX, kMeanOut, kInvstdOut, kSumDyOut, kSumDyXmuOut, kGradWeightOut, kGradBiasOut, kGradResidualOut };

std::vector<Output> outputs(Kind k, const Fusion& f = {}) {
  switch (k) {
    case Kind::kForwardAct: return {kY, kMeanOut, kInvstdOut};
    case Kind::kBackwardAct:
      if (f.residual) return {kDX, kGradWeightOut, kGradBiasOut, kGradResidualOut};
      return {kDX, kGradWeightOut, kGradBiasOut};
    case Kind::kCopy:
    case Kind::kElemt: return {kY};
    case Kind::kStats: return {kMeanOut, kInvstdOut};
    case Kind::kForward: return {kY, kMeanOut, kInvstdOut};
    case Kind::kBackwardReduce: return {kSumDyOut, kSumDyXmuOut};
    case Kind::kBackwardElemt: return {kDX};
    case Kind::kBackward: return {kDX, kGradWeightOut, kGradBiasOut};
  }
  return {};
}

const DeviceBuffer& output_buffer(const Tensors& t, Output k) {
  switch (k) {
    case kY: return t.y();
    case kDX: return t.dx();
    case kMeanOut: return t.channel(kMean);
    case kInvstdOut: return t.channel(kInvstd);
    case kSumDyOut: return t.channel(kSumDy);
    case kSumDyXmuOut: return t.channel(kSumDyXmu);
    case kGradWeightOut: return t.channel(kGradWeight);
    case kGradBiasOut: return t.channel(kGradBias);
    case kGradResidualOut: return t.grad_residual();
  }
  return t.y();
}

const char* output_name(Output k) {
  static const char* const names[] = {"y",          "dx",          "mean",      "invstd",       "sum_dy",
                                      "sum_dy_xmu", "grad_weight", "grad_bias", "grad_residual"};
  return names[k];
}

// The inputs as the device holds them (after init), in double.
struct HostInputs {
  Shape shape;
  Layout layout;
  std::vector<double> x, dy, residual;
  std::vector<double> channel[kChannels];
  int64_t at(int64_t m, int64_t c) const {  // offset of (element m, channel c)
    const int64_t C = shape.channels, S = shape.spatial;
    return layout == Layout::kChannelsLast ? m * C + c : ((m / S) * C + c) * S + m % S;
  }
};

// The activations in double (csrc/cuda/activation.cuh's definitions).
double activate(Act a, double z) {
  switch (a) {
    case Act::kRelu: return z <= 0 ? 0.0 : z;
    case Act::kLeakyRelu: return z > 0 ? z : z * kSlope;
    case Act::kSilu: return z / (1 + std::exp(-z));
    case Act::kGelu: return 0.5 * z * (1 + std::erf(z * M_SQRT1_2));
    case Act::kGeluTanh: return 0.5 * z * (1 + std::tanh(M_SQRT2 * M_2_SQRTPI * 0.5 * (z + 0.044715 * z * z * z)));
    default: return z;
  }
}
double activate_grad(Act a, double dy, double z) {  // dy * act'(z)
  switch (a) {
    case Act::kRelu: return z > 0 ? dy : 0.0;
    case Act::kLeakyRelu: return z > 0 ? dy : dy * kSlope;
    case Act::kSilu: {
      const double sigmoid = 1 / (1 + std::exp(-z));
      return dy * sigmoid * (1 + z * (1 - sigmoid));
    }
    case Act::kGelu: return dy * (0.5 * (1 + std::erf(z * M_SQRT1_2)) + z * std::exp(-0.5 * z * z) * M_2_SQRTPI * M_SQRT1_2 * 0.5);
    default: return dy;  // identity (kGeluTanh is not among the harness's launchers)
  }
}

// The float64 reference of every output of kind k (with fusion f for the
// fused kinds). An element whose derivative is taken at a kink (relu's,
// leaky_relu's z = 0) within float rounding of it is NaN: not compared.
std::map<Output, std::vector<double>> reference(Kind k, const HostInputs& in, const Fusion& f = {}) {
  const int64_t C = in.shape.channels, M = in.shape.per_channel();
  const auto& w = in.channel[kWeight];
  const auto& b = in.channel[kBias];
  const auto& mean = in.channel[kMean];
  const auto& invstd = in.channel[kInvstd];
  std::map<Output, std::vector<double>> out;
  auto tensor = [&](Output o) -> std::vector<double>& { return out[o] = std::vector<double>(in.x.size()); };
  auto per_channel = [&](Output o) -> std::vector<double>& { return out[o] = std::vector<double>(C); };
  auto normalize = [&](const std::vector<double>& mu, const std::vector<double>& is) {
    auto& y = tensor(kY);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t m = 0; m < M; ++m) y[in.at(m, c)] = (in.x[in.at(m, c)] - mu[c]) * is[c] * w[c] + b[c];
  };
  auto sums = [&](std::vector<double>& sdy, std::vector<double>& sdyx) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t m = 0; m < M; ++m) {
        const int64_t i = in.at(m, c);
        sdy[c] += in.dy[i];
        sdyx[c] += in.dy[i] * (in.x[i] - mean[c]);
      }
  };
  auto grad_input = [&](const std::vector<double>& mdy, const std::vector<double>& mdyx) {
    auto& dx = tensor(kDX);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t m = 0; m < M; ++m) {
        const int64_t i = in.at(m, c);
        dx[i] = (in.dy[i] - mdy[c] - (in.x[i] - mean[c]) * invstd[c] * invstd[c] * mdyx[c]) * invstd[c] * w[c];
      }
  };
  switch (k) {
    case Kind::kCopy: tensor(kY) = in.x; break;
    case Kind::kStats:
    case Kind::kForward: {
      auto& mu = per_channel(kMeanOut);
      auto& is = per_channel(kInvstdOut);
      for (int64_t c = 0; c < C; ++c) {
        double s = 0, q = 0;
        for (int64_t m = 0; m < M; ++m) s += in.x[in.at(m, c)];
        mu[c] = s / M;
        for (int64_t m = 0; m < M; ++m) q += (in.x[in.at(m, c)] - mu[c]) * (in.x[in.at(m, c)] - mu[c]);
        is[c] = 1.0 / std::sqrt(q / M + kEps);
      }
      if (k == Kind::kForward) normalize(mu, is);
      break;
    }
    case Kind::kElemt: normalize(mean, invstd); break;
    case Kind::kBackwardReduce: sums(per_channel(kSumDyOut), per_channel(kSumDyXmuOut)); break;
    case Kind::kBackwardElemt: grad_input(in.channel[kMeanDy], in.channel[kMeanDyXmu]); break;
    case Kind::kForwardAct: {
      auto& mu = per_channel(kMeanOut);
      auto& is = per_channel(kInvstdOut);
      auto& y = tensor(kY);
      for (int64_t c = 0; c < C; ++c) {
        auto bn_input = [&](int64_t m) { const double v = in.x[in.at(m, c)]; return f.pre_relu && v <= 0 ? 0.0 : v; };
        double s = 0, q = 0;
        for (int64_t m = 0; m < M; ++m) s += bn_input(m);
        mu[c] = s / M;
        for (int64_t m = 0; m < M; ++m) q += (bn_input(m) - mu[c]) * (bn_input(m) - mu[c]);
        is[c] = 1.0 / std::sqrt(q / M + kEps);
        for (int64_t m = 0; m < M; ++m) {
          const int64_t i = in.at(m, c);
          const double z = (bn_input(m) - mu[c]) * is[c] * w[c] + b[c] + (f.residual ? in.residual[i] : 0.0);
          y[i] = activate(f.act, z);
        }
      }
      break;
    }
    case Kind::kBackwardAct: {
      // With the given mean and invstd, as launch_backward_act takes them.
      std::vector<double> dz(in.x.size()), d(in.x.size());
      std::vector<bool> kink(in.x.size(), false);
      std::vector<double> sdz(C), sdzx(C);
      const bool kinked = f.act == Act::kRelu || f.act == Act::kLeakyRelu;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t m = 0; m < M; ++m) {
          const int64_t i = in.at(m, c);
          d[i] = (f.pre_relu && in.x[i] <= 0 ? 0.0 : in.x[i]) - mean[c];
          const double r = f.residual ? in.residual[i] : 0.0;
          const double zp = invstd[c] * w[c];
          const double z = d[i] * zp + b[c] + r;
          kink[i] = kinked && std::fabs(z) <= 1e-5 * (std::fabs(d[i] * zp) + std::fabs(b[c]) + std::fabs(r));
          dz[i] = activate_grad(f.act, in.dy[i], z);
          sdz[c] += dz[i];
          sdzx[c] += dz[i] * d[i];
        }
      auto& dx = tensor(kDX);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t m = 0; m < M; ++m) {
          const int64_t i = in.at(m, c);
          const double g = (dz[i] - sdz[c] / M - d[i] * invstd[c] * invstd[c] * sdzx[c] / M) * invstd[c] * w[c];
          dx[i] = kink[i] ? NAN : f.pre_relu && !(in.x[i] > 0) ? 0.0 : g;
        }
      auto& gw = per_channel(kGradWeightOut);
      for (int64_t c = 0; c < C; ++c) gw[c] = sdzx[c] * invstd[c];
      per_channel(kGradBiasOut) = sdz;
      if (f.residual) {
        auto& gr = tensor(kGradResidualOut);
        for (size_t i = 0; i < dz.size(); ++i) gr[i] = kink[i] ? NAN : dz[i];
      }
      break;
    }
    case Kind::kBackward: {
      std::vector<double> sdy(C), sdyx(C), mdy(C), mdyx(C);
      sums(sdy, sdyx);
      for (int64_t c = 0; c < C; ++c) {
        mdy[c] = sdy[c] / M;
        mdyx[c] = sdyx[c] / M;
      }
      grad_input(mdy, mdyx);
      auto& gw = per_channel(kGradWeightOut);
      for (int64_t c = 0; c < C; ++c) gw[c] = sdyx[c] * invstd[c];
      per_channel(kGradBiasOut) = sdy;
      break;
    }
  }
  return out;
}

// max |got - want| / max |want| (NaN stays NaN, so it fails) over the
// elements whose reference is not NaN (reference: not compared).
double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(want[i])) continue;
    const double e = std::fabs(got[i] - want[i]);
    err = std::isnan(e) ? e : std::max(err, e);
    scale = std::max(scale, std::fabs(want[i]));
    if (std::isnan(err)) break;
  }
  return scale > 0 ? err / scale : err;
}

int check_all(const Options& o, const Device& d) {
  const std::vector<const Op*> ops = selected_ops(o);
  std::printf("check: each launcher against a float64 host reference from the same inputs (max |err| / max |ref| "
              "per output; tolerance %g for per-channel outputs, per dtype for tensors), outputs poisoned with NaN "
              "before each run, each run twice and compared bitwise\n",
              kChannelTolerance);
  std::printf(kRowHeader, "case", "shape", "dtype", "layout", "MB", "plan");
  std::printf(" launcher max error ...\n");
  int runs = 0, failures = 0;
  const std::vector<std::string> rows = on_each_config(o, d, [&](const Config& cfg, Tensors& data) {
    const Run run = data.run(cfg.plan);
    const int64_t n = cfg.c.shape().numel(), C = cfg.c.shape().channels;
    const DType dtype = cfg.t.dtype;
    HostInputs in{cfg.c.shape(), cfg.layout, widen(read_raw(data.x(), dtype, n), dtype),
                  widen(read_raw(data.dy(), dtype, n), dtype), widen(read_raw(data.residual(), dtype, n), dtype), {}};
    for (int k = 0; k < kChannels; ++k) {
      in.channel[k] = widen(read_raw(data.channel(Channel(k)), DType::kFloat, C), DType::kFloat);
    }
    std::string failed;
    JsonObject results;
    for (const Op* op : ops) {
      const std::map<Output, std::vector<double>> want = reference(op->kind, in, op->fusion);
      std::vector<std::vector<unsigned char>> first;
      double worst = 0;
      bool ok = true, deterministic = true;
      JsonObject errors;
      for (int attempt = 0; attempt < 2; ++attempt) {
        data.init();  // stats and forward overwrite mean and invstd, the other launchers' inputs
        for (Output k : outputs(op->kind, op->fusion)) {
          const DeviceBuffer& b = output_buffer(data, k);
          check(cudaMemsetAsync(b.get(), 0xff, b.bytes(), d.stream), "poison");  // NaN in float, bfloat16 and half
        }
        check(op->launch(run, d.stream), op->name);
        check(cudaStreamSynchronize(d.stream), op->name);
        size_t j = 0;
        for (Output k : outputs(op->kind, op->fusion)) {
          const bool is_tensor = k == kY || k == kDX || k == kGradResidualOut;
          const DType out_dtype = is_tensor ? dtype : DType::kFloat;
          std::vector<unsigned char> raw = read_raw(output_buffer(data, k), out_dtype, is_tensor ? n : C);
          if (attempt == 0) {
            const double err = relative_error(widen(raw, out_dtype), want.at(k));
            const double tol = op->kind == Kind::kCopy ? 0.0 : is_tensor ? cfg.t.tolerance : kChannelTolerance;
            ok = ok && err <= tol;
            worst = std::isnan(err) ? err : std::max(worst, err);
            errors.num(output_name(k), err);
            if (!(err <= tol)) failed += std::string(" ") + op->name + "." + output_name(k) + "=" + jnum(err);
            first.push_back(std::move(raw));
          } else if (raw != first[j++]) {
            deterministic = false;
            failed += std::string(" ") + op->name + "." + output_name(k) + " differs run to run";
          }
        }
      }
      ++runs;
      failures += !(ok && deterministic);
      char cell[32];
      std::snprintf(cell, sizeof cell, "%.1e", worst);
      std::printf(" %s %s", op->label, ok && deterministic ? cell : "FAIL");
      results.raw(op->name, JsonObject()
                                .raw("errors", errors.text())
                                .boolean("ok", ok)
                                .boolean("deterministic", deterministic)
                                .text());
    }
    if (!failed.empty()) std::printf("  FAILED:%s", failed.c_str());
    return results.text();
  });
  std::printf("check: %d launcher runs, %d failed\n", runs, failures);
  write_json(o.json, mode_json("check", d)
                         .num("runs", runs)
                         .num("failures", failures)
                         .raw("rows", json_array(rows))
                         .text());
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  if (o.mode == Mode::kPlan && o.sms > 0) return print_plans(o, o.sms);  // no CUDA call at all
  const Device d = open_device(o);
  switch (o.mode) {
    case Mode::kPlan: return print_plans(o, d.sms);
    case Mode::kCheck: return check_all(o, d);
    case Mode::kSweep: return sweep(o, d);
    case Mode::kTime: return time_all(o, d);
  }
  return 1;
}
