"""The CUDA kernels' acceptance bars (issues #10 and #11), judged from kernel
benchmark JSON files (rows of all of them together):

    python -m benchmarks.cuda_bars benchmarks/results/gpu-<device>/kernels.json [fused/kernels.json]

Bars (on an H200, torch and bnfast in the same run):
  * training forward+backward at least 1.3x torch on every case, in float32
    NCHW and in bfloat16 channels_last (4-D and 5-D);
  * never below 1.0x torch in any phase (eval forward included);
  * bandwidth: on tensors of 32 MB or more, bnfast's effective bandwidth under
    the streaming model (training forward 3 passes, backward 5, ...) at least
    85% of a measured device-to-device copy of the same tensor, every phase;
  * when a file has fused configurations (--fusions): BN -> relu and
    BN + add -> relu training forward+backward at least 1.5x torch's unfused
    modules.
The plain bars are judged on the plain (unfused) rows.
Prints one line per bar with its worst case, and exits 1 if any bar is missed,
has no rows to judge, or the benchmark reported errors.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.bars import judge
from benchmarks.bars import report as bars_report

LARGE_BYTES = 32 << 20
BANDWIDTH_FRACTION = 0.85
FWD_BWD_SPEEDUP = 1.3
ANY_PHASE_SPEEDUP = 1.0
FUSED_SPEEDUP = 1.5
FUSED_BARRED = ("relu", "add_relu")


def bars(result: dict) -> list[dict]:
    """The judged bars (benchmarks.bars.judge) for the rows of one kernel
    benchmark result."""
    rows = [r for r in result["rows"] if r.get("fusion", "none") == "none"]
    fused = [r for r in result["rows"] if r.get("fusion", "none") in FUSED_BARRED and r["phase"] == "fwd_bwd"]
    fusions_run = set(result.get("options", {}).get("fusions", ["none"])) - {"none"}
    large = [r for r in rows if r["numel"] * r["elem_bytes"] >= LARGE_BYTES]
    fp32_nchw = [r for r in rows if r["dtype"] == "float32" and r["format"] == "nchw" and r["phase"] == "fwd_bwd"]
    bf16_cl = [r for r in rows if r["dtype"] == "bfloat16" and r["format"] == "channels_last"
               and len(r["shape"]) in (4, 5) and r["phase"] == "fwd_bwd"]
    fused_bar = [judge("fused relu / add+relu fwd+bwd speed-up vs torch unfused", FUSED_SPEEDUP, fused,
                       lambda r: r["speedup"])] if fusions_run else []
    return [
        judge("float32 NCHW fwd+bwd speed-up", FWD_BWD_SPEEDUP, fp32_nchw, lambda r: r["speedup"]),
        judge("bfloat16 channels_last fwd+bwd speed-up", FWD_BWD_SPEEDUP, bf16_cl, lambda r: r["speedup"]),
        judge("speed-up in every phase", ANY_PHASE_SPEEDUP, rows, lambda r: r["speedup"]),
        judge(f"bandwidth >= {BANDWIDTH_FRACTION:.0%} of copy, tensors >= {LARGE_BYTES >> 20} MB",
              BANDWIDTH_FRACTION, large, lambda r: r["bnfast_frac_copy"]),
    ] + fused_bar


def report(result: dict) -> tuple[str, bool]:
    """A short table of the bars, and whether all that apply are met."""
    title = f"CUDA bars ({result.get('machine', {}).get('gpu_name') or result.get('device')}):"
    return bars_report(title, bars(result), result.get("errors", []))


def merged(results: list[dict]) -> dict:
    """One result with the rows, errors and fusions of several benchmark runs."""
    fusions = sorted({f for r in results for f in r.get("options", {}).get("fusions", ["none"])})
    return {"rows": [row for r in results for row in r["rows"]],
            "errors": [e for r in results for e in r.get("errors", [])],
            "options": {"fusions": fusions}, "machine": results[0].get("machine", {}),
            "device": results[0].get("device")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda_bars", description=__doc__.splitlines()[0])
    p.add_argument("kernels_json", nargs="+",
                   help="kernels.json files written by python -m benchmarks.kernels --device cuda")
    args = p.parse_args(argv)
    results = []
    for path in args.kernels_json:
        with open(path) as f:
            results.append(json.load(f))
    text, ok = report(merged(results))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
