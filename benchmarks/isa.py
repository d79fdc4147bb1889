"""What each CPU instruction-set build of bnfast's loops gives.

bnfast picks its loops with torch's own CPU capability, which the
ATEN_CPU_CAPABILITY environment variable caps; this runs the fused training
forward and backward ops in one subprocess per capability and prints median
times (torch.utils.benchmark) and the speed-up over the baseline build.

    python -m benchmarks.isa [--shapes 128x32x30x30 ...] [--channels-last]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CAPABILITIES = ("default", "avx2", "avx512")
DEFAULT_SHAPES = ("128x32x30x30", "128x64x13x13", "128x64x4x4", "256x4096")


def _measure(shapes, channels_last, dtype_name, min_run_time):
    import torch
    import torch.utils.benchmark as benchmark

    import bnfast  # noqa: F401

    dtype = getattr(torch, dtype_name)
    results = {"capability": torch.backends.cpu.get_cpu_capability(), "times_ms": {}}
    for text in shapes:
        shape = [int(s) for s in text.split("x")]
        x = torch.randn(shape, dtype=dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        _, mean, invstd = torch.ops.bnfast.forward(x, None, None, 1e-5)
        for phase, stmt in (("forward", "ops.forward(x, None, None, 1e-5)"),
                            ("backward", "ops.backward(g, x, mean, invstd, None)")):
            timer = benchmark.Timer(stmt, globals={"ops": torch.ops.bnfast, "x": x, "g": g,
                                                   "mean": mean, "invstd": invstd})
            results["times_ms"][f"{text} {phase}"] = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the capabilities")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_measure(args.shapes, args.channels_last, args.dtype, args.min_run_time)))
        return
    import statistics

    runs = {cap: [] for cap in CAPABILITIES}
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits all alike
        for cap in CAPABILITIES:
            env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
            cmd = [sys.executable, "-m", "benchmarks.isa", "--worker", "1", "--dtype", args.dtype,
                   "--min-run-time", str(args.min_run_time), "--shapes", *args.shapes]
            if args.channels_last:
                cmd.append("--channels-last")
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            runs[cap].append(json.loads(out.strip().splitlines()[-1]))
    keys = list(runs["default"][0]["times_ms"])
    print(f"| case | {' | '.join(runs[c][0]['capability'] for c in CAPABILITIES)} (ms, median of {args.rounds} runs) | speed-up vs default |")
    print("|---|" + "---|" * (len(CAPABILITIES) + 1))
    for key in keys:
        med = {c: statistics.median(r["times_ms"][key] for r in runs[c]) for c in CAPABILITIES}
        ups = " / ".join(f"{med['default'] / med[c]:.2f}x" for c in CAPABILITIES[1:])
        print(f"| {key} {args.dtype}{' CL' if args.channels_last else ''} | "
              + " | ".join(f"{med[c]:.3f}" for c in CAPABILITIES) + f" | {ups} |")


if __name__ == "__main__":
    main()
