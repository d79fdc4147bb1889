// The CPU path's tuning constants: how work is cut into tasks and which
// loop a shape takes. Results never depend on them (see parallel.h), only
// speed; each was picked with the kernel benchmark on the shapes it decides,
// e.g. `python -m benchmarks.kernels --cases seed_bn1 seed_bn2 seed_bn3` and
// `python -m benchmarks.isa` (results under benchmarks/results/), and the
// tests derive the shapes of each path from these values (tests/samples.py).
#pragma once

#include <cstdint>

namespace bnfast {
namespace cpu {

// Elements per chunk of elementwise work: large enough to amortize a task,
// small enough to split the seed CNN's smallest layer (128x64x4x4) across cores.
constexpr int64_t kGrain = 32768;
// Reductions keep [chunks][2][C] partial sums in double, zeroed and added up
// serially, so their chunks are larger: a chunk holds at least
// kReduceGrain elements (and, channels-last, kMinRowsPerChunk rows, so the
// partial sums stay small next to the data) and there are at most kMaxChunks.
constexpr int64_t kReduceGrain = 1 << 16;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinRowsPerChunk = 64;

// Channels-first planes shorter than kShortPlane values are read as rows
// (short_planes_as_rows, parallel.h), up to rows of kMaxRowWidth values, whose
// per-column coefficients and partial sums stay in L2.
constexpr int64_t kShortPlane = 32;
constexpr int64_t kMaxRowWidth = 1 << 14;
// Channels-first planes shorter than kBandPlane values (and not read as
// rows), in half precision or, in float32, of whole vectors, are reduced in
// bands of whole channels when the batch has at least
// kMinBandRows samples (planes_in_bands, parallel.h): python -m
// benchmarks.kernels --cases r18_s3 r50_s3 r50_s4 --formats nchw. float32
// planes with a tail stay on the plane loops, which measured as fast or
// faster there.
constexpr int64_t kBandPlane = 256;
constexpr int64_t kMinBandRows = 16;

// Blocks of whole channels (channels_per_block, parallel.h: the reductions
// over channels-first planes, and training's fused passes over short planes):
// at most kChannelBlockBytes per tensor read, and at least kMinBlockRowBytes
// per row (narrower strided segments waste cache lines); tensors of
// kMinSplitElements and more are split across every thread.
constexpr int64_t kChannelBlockBytes = 256 << 10;
constexpr int64_t kMinBlockRowBytes = 256;
constexpr int64_t kMinSplitElements = 8192;
// The reductions over longer channels-first planes (not in bands) walk
// blocks of whole channels too, as one run of planes per sample, when a block
// holds at least kMinRunPlanes channels: with fewer, each run's fixed cost
// (zeroing, folding and summing its channels' lane sums) outweighs the cache
// reuse (python -m benchmarks.kernels --cases r50_s3 r50_s4 seed_bn2
// --formats nchw --phases fwd_train bwd).
constexpr int64_t kMinRunPlanes = 4;

// A channels-last affine task (affine_cl, loops.h) streaming at most
// kCacheResidentBytes (counting x, out and dy; a fusion's residual streams
// are not counted) takes several rows per pass over a
// row's channel vectors, so each coefficient vector loaded serves them all;
// larger ones walk rows in memory order, which the hardware prefetchers
// follow (python -m benchmarks.kernels --cases seed_bn3 r18_s2 r18_s4 r50_s2
// r50_s3 --phases fwd_eval bwd). One core's L2 on the machines measured.
// The training forward over short planes fuses its two passes only from
// this size of x on (fused_channels_per_block, parallel.h).
constexpr int64_t kCacheResidentBytes = 1 << 20;
// An affine pass moving more than kNonTemporalBytes in all (x and out, and
// dy in the backward; as above, a fusion's residual streams are not counted)
// writes its output with non-temporal stores: the output would leave the
// last-level cache before anything reads it, and such stores neither read
// each line before overwriting it nor evict the input. Below that they cost:
// the output no longer stays in cache. The last-level cache of the machines
// measured is 32 MiB (python -m benchmarks.kernels --cases r50_s1 r50_s3
// --phases fwd_eval bwd, above it; seed_bn1 r18_s4, below).
constexpr int64_t kNonTemporalBytes = 32 << 20;
// The cache line of the machines measured. Where a vector is one line long,
// a streaming affine pass stores the values before a channels-first plane's
// (or run of planes') first aligned address plainly, so that all its full
// vectors stream (loops.cpp, Output::lanes_to_alignment).
constexpr int64_t kCacheLineBytes = 64;

// A channels-last reduction (reduce_cl, loops.h; channels-first short
// planes read as rows, and bands, too) reading at most kWholeBlockBytes in
// all (x, and dy in the backward) sums rows wider than its register block
// one block of columns at a time over all of a task's rows: fewer restarts
// of the register sums. Larger ones
// walk tiles of a few whole rows, block by block, whose reads stay close to
// memory order (python -m benchmarks.kernels --cases r18_s3 r50_s3_mid
// r50_s2 r50_s3 --phases fwd_train bwd). Half the last-level cache of the
// machines measured.
constexpr int64_t kWholeBlockBytes = 16 << 20;

}  // namespace cpu
}  // namespace bnfast
