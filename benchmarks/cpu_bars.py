"""The CPU speed bars of issue #13, measured on this machine with the kernel
benchmark (float32, training forward+backward unless said):

    python -m benchmarks.cpu_bars [--out DIR] [--runs 5]

  * channels_last: at least 1.5x torch on 128x32x30x30, 128x64x13x13,
    128x64x4x4, 64x128x16x16 and 32x256x14x14, and within 1.5x of the
    streaming bound from a measured copy of the same tensor (effective
    bandwidth under the streaming model, 8 passes, at least 1/1.5 of the
    copy's);
  * 128x64x4x4 NCHW: at least 2x torch as the median of --runs benchmark runs
    (each interleaving torch and bnfast round by round);
  * eval forward never below 1.0x torch on the kernel benchmark's default
    cases (every dtype and format).
Prints one line per bar with its worst case and exits 1 if any is missed.

One more line gives context, not a bar: the channels_last fwd+bwd of a layer
far beyond the last-level cache (BEYOND_CACHE_CASE, 102 MB a tensor), where
copy and batch norm both stream from DRAM. The five bar shapes (6-15 MB a
tensor) are timed in the cache's regime: the copy's two tensors stay cached,
fwd+bwd's four (x, y, dy, dx) only in part, which varies with how much of
them the interleaved torch runs evict; so their fraction of copy measures
cache residency as much as the kernels.
The benchmark's JSON and markdown go under --out. Takes about a minute on
2 cores; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import kernels
from benchmarks.bars import judge, label, report

CHANNELS_LAST_CASES = ("seed_bn1", "seed_bn2", "seed_bn3", "r18_b64_s2", "r50_s3_mid")
CHANNELS_LAST_SPEEDUP = 1.5
STREAMING_SLACK = 1.5  # bnfast's time at most this multiple of the streaming bound
BEYOND_CACHE_CASE = "r50_s1"
SMALL_CASE = "seed_bn3"
SMALL_SPEEDUP = 2.0
EVAL_SPEEDUP = 1.0


def measure(out: Path, runs: int, quiet: bool = True) -> dict:
    """The kernel benchmark runs the bars need: {"channels_last": result,
    "small": [result per run], "eval": result, "beyond_cache": result}."""
    common = {"dtypes": ["float32"], "no_plot": True, "quiet": quiet}
    channels_last = kernels.run(common, cases=list(CHANNELS_LAST_CASES), formats=["channels_last"],
                                phases=["fwd_bwd"], out=str(out / "channels_last"))
    small = [kernels.run(common, cases=[SMALL_CASE], formats=["nchw"], phases=["fwd_bwd"],
                         out=str(out / f"small-run{i + 1}")) for i in range(runs)]
    ev = kernels.run({"no_plot": True, "quiet": quiet}, phases=["fwd_eval"], out=str(out / "eval"))
    beyond = kernels.run(common, cases=[BEYOND_CACHE_CASE], formats=["channels_last"], phases=["fwd_bwd"],
                         out=str(out / "beyond_cache"))
    return {"channels_last": channels_last, "small": small, "eval": ev, "beyond_cache": beyond}


def context_lines(measured: dict) -> list[str]:
    """The beyond-cache run's rows, as lines under the bars."""
    return [f"  context  float32 channels_last fwd+bwd beyond the last-level cache (not a bar): {label(r)}: "
            f"{r['speedup']:.2f}x torch, bnfast at {100 * r['bnfast_frac_copy']:.0f}% of copy "
            f"(torch at {100 * r['torch_frac_copy']:.0f}%)"
            for r in measured["beyond_cache"]["rows"]]


def median_row(rows: list[dict]) -> dict:
    """The row with the median speed-up of an odd number of runs (the lower
    middle one of an even number), labelled with the run count."""
    ordered = sorted(rows, key=lambda r: r["speedup"])
    row = ordered[(len(ordered) - 1) // 2]
    return dict(row, phase=f"{row['phase']} (median of {len(rows)} runs)")


def bars(measured: dict) -> list[dict]:
    """The judged bars (benchmarks.bars.judge) of measure()'s results."""
    cl = [r for r in measured["channels_last"]["rows"] if r["phase"] == "fwd_bwd"]
    small = [r for res in measured["small"] for r in res["rows"] if r["phase"] == "fwd_bwd"]
    ev = [r for r in measured["eval"]["rows"] if r["phase"] == "fwd_eval"]
    return [
        judge("float32 channels_last fwd+bwd speed-up", CHANNELS_LAST_SPEEDUP, cl, lambda r: r["speedup"]),
        judge(f"float32 channels_last fwd+bwd bandwidth, fraction of copy (streaming bound / {STREAMING_SLACK})",
              1 / STREAMING_SLACK, cl, lambda r: r["bnfast_frac_copy"]),
        judge(f"{SMALL_CASE} float32 NCHW fwd+bwd speed-up", SMALL_SPEEDUP,
              [median_row(small)] if small else [], lambda r: r["speedup"]),
        judge("eval forward speed-up, default cases", EVAL_SPEEDUP, ev, lambda r: r["speedup"]),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_bars", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/cpu-bars-<time>)")
    p.add_argument("--runs", type=int, default=5, help="runs of the small NCHW case (default %(default)s)")
    p.add_argument("--verbose", action="store_true", help="the benchmark's per-configuration lines")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    out = Path(args.out or Path(__file__).resolve().parent / "results" / time.strftime("cpu-bars-%Y%m%d-%H%M%S"))
    measured = measure(out, args.runs, quiet=not args.verbose)
    machine = measured["eval"]["machine"]
    errors = [e for res in (measured["channels_last"], measured["eval"], measured["beyond_cache"], *measured["small"])
              for e in res["errors"]]
    title = (f"CPU bars ({machine['cpu_model']}, {machine['torch_threads']} threads, torch {machine['torch_version']}; "
             f"small-case speed-ups per run: "
             + ", ".join(f"{r['speedup']:.2f}" for res in measured["small"] for r in res["rows"]) + "):")
    text, ok = report(title, bars(measured), errors)
    text = "\n".join([text, *context_lines(measured)])
    (out / "bars.txt").write_text(text + "\n")
    print(text)
    print(f"results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
