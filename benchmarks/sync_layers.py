"""Per-layer SyncBatchNorm benchmark (issue #12's GPU bar): the training
forward+backward of one synchronized batch-norm layer, per rank, on
--world-size processes, for the kernel benchmark's cases.

    python -m benchmarks.sync_layers [--device cpu|cuda] [--cases ...] [--dtypes ...]
                                     [--formats ...] [--iters N] [--out DIR]

Variants, built with the same parameters:

  torch   torch.nn.SyncBatchNorm (CUDA only: torch's refuses CPU input once a
          process group is initialized)
  bnfast  bnfast.SyncBatchNorm
  local   bnfast's BatchNorm*d, unsynchronized: what the collectives cost

Each rank holds one input of the case's shape (the global batch is
world-size times the case's), parameters in float32 as in the kernel
benchmark. Backend: NCCL when there is a GPU per rank, else gloo (ranks then
share a GPU, and gloo stages CUDA tensors through the host); --backend
chooses.

Timing: every iteration the ranks meet at a barrier, then each times
forward + backward (input, weight and bias gradients) with time.perf_counter,
after synchronizing the device before and after; the iteration's time is the
slowest rank's. The variants take turns iteration by iteration (the order
alternates), after --warmup untimed iterations each; medians over --iters.

Bar (issue #12, CUDA, world size 2): bnfast at least 1.2x torch (ratio of
the medians) on every configuration of the default cases.

Results: <out>/sync_layers.json and sync_layers.md (default
benchmarks/results/sync-layers-<device>/). Library use: run(options) -> dict.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from benchmarks import cli_main, kernels, merge_options, write_results
from benchmarks.ddp import init_rank, resolve_backend, spawn

BAR_SPEEDUP = 1.2
BAR_DEVICE = "cuda"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync_layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when torch sees a GPU, else cpu")
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                   help="default: nccl with a GPU per rank, else gloo")
    p.add_argument("--world-size", type=int, default=2, help="processes (default %(default)s)")
    p.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                   help="kernel benchmark cases or groups (default: its default cases)")
    p.add_argument("--quick", action="store_true", help="the kernel benchmark's quick cases")
    p.add_argument("--dtypes", nargs="+", default=list(kernels.DTYPES), choices=list(kernels.DTYPES))
    p.add_argument("--formats", nargs="+", default=list(kernels.FORMATS), choices=list(kernels.FORMATS),
                   help="channels_last applies to 4-D and 5-D cases")
    p.add_argument("--iters", type=int, default=50, help="timed iterations per variant (default %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per variant (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before the ranks are killed")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/sync-layers-<device>)")
    return p


def variants(device: str) -> tuple:
    return ("torch", "bnfast", "local") if device == "cuda" else ("bnfast", "local")


def configurations(args) -> list:
    """(case, dtype name, format) in order; channels_last only where the case has 4 or 5 dims."""
    cases = kernels.select_cases(args.cases or [], "quick" if args.quick else "default", args.device)
    return [(c, d, f) for c in cases for d in args.dtypes for f in args.formats
            if kernels._memory_format(f, len(c.shape)) is not None]


def _layers(case, device: torch.device, names) -> dict:
    """{variant: module} with the same non-trivial parameters."""
    import bnfast

    c = case.shape[1]
    make = {"torch": lambda: nn.SyncBatchNorm(c), "bnfast": lambda: bnfast.SyncBatchNorm(c),
            "local": lambda: getattr(bnfast, case.module)(c)}
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    layers = {}
    for name in names:
        m = make[name]().to(device)
        with torch.no_grad():
            m.weight.copy_(weight)
            m.bias.copy_(bias)
        layers[name] = m
    return layers


def _worker(rank: int, args: argparse.Namespace, store: str, out_path: str) -> None:
    device, synchronize = init_rank(rank, args, store)
    names = variants(args.device)
    records = []
    for case, dtype_name, fmt in configurations(args):
        g = torch.Generator(device).manual_seed(rank)  # each rank its own slice of the batch
        fmt_ = kernels._memory_format(fmt, len(case.shape))
        dtype = kernels.DTYPES[dtype_name]
        x = (torch.randn(case.shape, generator=g, device=device) * 2 + 1).to(dtype)
        x = x.contiguous(memory_format=fmt_).requires_grad_()
        dy = torch.randn(case.shape, generator=g, device=device).to(dtype).contiguous(memory_format=fmt_)
        layers = _layers(case, device, names)

        def step(m):
            torch.autograd.grad(m(x), (x, m.weight, m.bias), dy)

        times = {name: [] for name in names}
        for it in range(args.warmup + args.iters):
            for name in (names if it % 2 == 0 else names[::-1]):
                dist.barrier()
                synchronize()
                t0 = time.perf_counter()
                step(layers[name])
                synchronize()
                if it >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        records.append({"case": case.name, "shape": list(case.shape), "dtype": dtype_name,
                        "format": kernels.format_label(fmt, len(case.shape)), "times_s": times})
    gathered = [None] * args.world_size
    dist.all_gather_object(gathered, records)
    if rank == 0:
        import json
        Path(out_path).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def summarize(per_rank: list, device: str) -> dict:
    """One row per configuration: median ms per variant (slowest rank per
    iteration), bnfast's speed-up over torch and the synchronization's cost
    over local; the bar on CUDA."""
    rows = []
    for configs in zip(*per_rank):
        row = {k: configs[0][k] for k in ("case", "shape", "dtype", "format")}
        medians = {name: 1e3 * statistics.median(max(ts) for ts in zip(*(c["times_s"][name] for c in configs)))
                   for name in configs[0]["times_s"]}
        row["median_ms"] = medians
        row["speedup"] = medians["torch"] / medians["bnfast"] if "torch" in medians else None
        row["sync_overhead"] = medians["bnfast"] / medians["local"] - 1
        rows.append(row)
    speedups = [r["speedup"] for r in rows if r["speedup"] is not None]
    bar = {"speedup_min": BAR_SPEEDUP, "device": BAR_DEVICE,
           "worst": min(speedups) if speedups else None,
           "met": (min(speedups) >= BAR_SPEEDUP) if speedups and device == BAR_DEVICE else None}
    return {"rows": rows, "bar": bar}


def markdown(result: dict) -> str:
    o, m, s = result["options"], result["machine"], result["summary"]
    where = m["gpu_name"] if o["device"] == "cuda" else m["cpu_model"]
    names = variants(o["device"])
    lines = [f"# SyncBatchNorm per layer: training forward+backward, {o['world_size']} ranks ({o['backend']})", "",
             f"{where}, torch {m['torch_version']}; one input of the case's shape per rank, parameters float32; "
             f"median of {o['iters']} interleaved iterations after {o['warmup']} warm-up, the slowest rank's "
             "time per iteration.", "",
             "| case | shape (per rank) | dtype | format | " + " | ".join(f"{n} (ms)" for n in names)
             + (" | speed-up vs torch" if "torch" in names else "") + " | sync cost over local |",
             "|---|---|---|---|" + "---:|" * (len(names) + ("torch" in names) + 1)]
    for r in s["rows"]:
        cells = [r["case"], "x".join(map(str, r["shape"])), r["dtype"], r["format"]]
        cells += [f"{r['median_ms'][n]:.3f}" for n in names]
        if "torch" in names:
            cells.append(f"{r['speedup']:.2f}x")
        cells.append(f"{100 * r['sync_overhead']:+.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    bar = s["bar"]
    lines.append("")
    if bar["met"] is None:
        lines.append(f"Bar (issue #12): bnfast at least {bar['speedup_min']}x torch.nn.SyncBatchNorm on "
                     f"{bar['device']}: not judged here (torch's SyncBatchNorm runs on CUDA only).")
    else:
        lines.append(f"Bar (issue #12): bnfast at least {bar['speedup_min']}x torch.nn.SyncBatchNorm on every "
                     f"configuration: {'met' if bar['met'] else 'NOT met'} (worst {bar['worst']:.2f}x).")
    return "\n".join(lines) + "\n"


def run(options=None, **overrides) -> dict:
    """Run the benchmark; write sync_layers.json and .md into options.out; return the results."""
    args = merge_options(build_parser(), options, overrides)
    if args.world_size < 2 or args.iters < 1:
        raise ValueError("--world-size must be >= 2 and --iters >= 1")
    resolve_backend(args)
    if not configurations(args):
        raise ValueError("no configuration: the cases, dtypes and formats given select nothing")
    args.out = args.out or f"benchmarks/results/sync-layers-{args.device}"
    machine = kernels.machine_info(args.device)
    machine["torch_threads"] = args.threads  # per rank
    t0 = time.perf_counter()
    per_rank = spawn(_worker, args)
    result = {"benchmark": "bnfast_sync_layers", "machine": machine, "options": vars(args),
              "summary": summarize(per_rank, args.device), "per_rank": per_rank,
              "elapsed_s": time.perf_counter() - t0}
    return write_results(result, args.out, "sync_layers", markdown)


def main(argv=None) -> int:
    return cli_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
