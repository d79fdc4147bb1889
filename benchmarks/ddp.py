"""DDP benchmark: what synchronizing batch norm costs in a data-parallel step.

The seed CNN (benchmarks.train_cifar.build_model("seed"), 3 BN layers) is
trained with DistributedDataParallel on --world-size processes (one thread
each by default), on the CPU (gloo) or on CUDA (--device cuda: NCCL when
there is a GPU per rank, else gloo with the ranks sharing a GPU; --backend
chooses), in variants built from the same initial weights:

  sync    bnfast.SyncBatchNorm.convert_sync_batchnorm(model): batch statistics
          over all ranks (one all_gather per BN forward, one all_reduce per BN
          backward)
  local   bnfast.convert(model): bnfast's BatchNorm2d, each rank normalizing
          with its own batch's statistics
  torch   (CUDA only: torch's refuses CPU input) torch.nn.SyncBatchNorm.
          convert_sync_batchnorm(model), torch's own layers, never fused

With --fuse both start from bnfast.convert(model, fuse=True): the seed CNN's
relu -> BN pairs become BatchNormAct2d(act="pre_relu") (local) and
SyncBatchNormAct (sync).

Data: random CIFAR-shaped batches (3x32x32, 10 classes), --batch images PER
RANK (default 128, so a global batch of 256 on 2 ranks); a few batches are
made before timing and cycled.

Timing: the variants take turns (the order reverses every step), so load
from elsewhere on the machine hits all alike; before each step the ranks meet
at a barrier (not timed). A step is zero_grad + forward + loss + backward +
optimizer step, timed with time.perf_counter on every rank (on CUDA after
synchronizing the device before and after); the step's time is the slowest
rank's. The BN collectives are timed inside bnfast.SyncBatchNorm (its
_all_gather_stats / _all_reduce_sums, wrapped here), summed per step and
averaged over ranks; on gloo they are synchronous, so this is the time spent
in them, waiting for the other ranks included (with NCCL, only their launch).

Bar (issue #12, CPU): the sync step costs at most 15% more than the local
step (median step times). On CUDA the report adds bnfast's speed-up over
torch's SyncBatchNorm; the GPU bar itself is per layer
(python -m benchmarks.sync_layers).

Usage: ``python -m benchmarks.ddp [--device cpu|cuda] [--steps N] [--batch B] [--world-size R] [--fuse]
[--out DIR]`` (``-h`` for all); results in benchmarks/results/ddp-<device>/ (ddp.json, ddp.md).
Library use: ``run(options) -> dict``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks import cli_main, merge_options, write_results

VARIANTS = ("local", "sync")
CUDA_VARIANTS = VARIANTS + ("torch",)
BAR_OVERHEAD = 0.15
COLLECTIVES = ("_all_gather_stats", "_all_reduce_sums")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default %(default)s")
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                   help="default: gloo on the CPU; on CUDA nccl with a GPU per rank, else gloo")
    p.add_argument("--world-size", type=int, default=2, help="processes (default %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="images per rank (default %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per variant (default %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fuse", action="store_true", help="both variants fused: bnfast.convert(model, fuse=True)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before the ranks are killed")
    p.add_argument("--out", default=None, help="default benchmarks/results/ddp-<device>")
    return p


def _timed_collectives(sbn, seconds: dict, calls: dict) -> None:
    """Wrap bnfast.SyncBatchNorm's collectives: time and count every call."""
    for name in COLLECTIVES:
        fn = getattr(sbn, name)

        @functools.wraps(fn)
        def timed(*args, _fn=fn, **kwargs):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                seconds["step"] += time.perf_counter() - t0
                calls["step"] += 1
        setattr(sbn, name, timed)


def resolve_backend(args: argparse.Namespace) -> None:
    """Check args.device and fill in args.backend: gloo on the CPU; on CUDA
    NCCL when there is a GPU per rank, else gloo (the ranks share GPUs)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no GPU")
    if args.backend is None:
        enough_gpus = args.device == "cuda" and torch.cuda.device_count() >= args.world_size
        args.backend = "nccl" if enough_gpus else "gloo"
    if args.backend == "nccl" and args.device != "cuda":
        raise ValueError("--backend nccl needs --device cuda")


def init_rank(rank: int, args: argparse.Namespace, store: str):
    """In a spawned rank: threads, this rank's device (GPU rank % count on
    CUDA) and the process group; returns (device, synchronize), synchronize
    waiting for the device's queued work (nothing to wait for on the CPU)."""
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        synchronize = torch.cuda.synchronize
    else:
        device, synchronize = torch.device("cpu"), (lambda: None)
    dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=args.world_size)
    return device, synchronize


def variants(device: str) -> tuple:
    return CUDA_VARIANTS if device == "cuda" else VARIANTS


def _worker(rank: int, args: argparse.Namespace, store: str, out_path: str) -> None:
    device, synchronize = init_rank(rank, args, store)
    import bnfast
    from bnfast import sync_batchnorm as sbn
    from benchmarks.train_cifar import build_model

    seconds, calls = {"step": 0.0}, {"step": 0}
    _timed_collectives(sbn, seconds, calls)
    torch.manual_seed(args.seed)
    base = build_model("seed")
    models = {"local": bnfast.convert(copy.deepcopy(base), fuse=args.fuse),
              "sync": bnfast.SyncBatchNorm.convert_sync_batchnorm(bnfast.convert(copy.deepcopy(base),
                                                                                 fuse=args.fuse))}
    if args.device == "cuda":
        models["torch"] = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
    models = {name: m.to(device) for name, m in models.items()}
    fused_layers = {name: sum(isinstance(layer, (bnfast.BatchNormAct2d, bnfast.SyncBatchNormAct))
                              for layer in m.modules()) for name, m in models.items()}
    models = {name: nn.parallel.DistributedDataParallel(m, device_ids=[device] if device.type == "cuda" else None)
              for name, m in models.items()}
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in models.items()}
    g = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own data
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
                torch.randint(0, 10, (args.batch,), generator=g).to(device)) for _ in range(4)]
    loss_fn = nn.CrossEntropyLoss()
    records = {name: {"step_s": [], "collective_s": [], "collectives": [], "fused_layers": fused_layers[name]}
               for name in models}
    names = variants(args.device)
    for step in range(args.warmup + args.steps):
        x, y = batches[step % len(batches)]
        for name in (names if step % 2 == 0 else names[::-1]):
            model, opt = models[name], opts[name]
            dist.barrier()
            synchronize()
            seconds["step"], calls["step"] = 0.0, 0
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            synchronize()
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                rec = records[name]
                rec["step_s"].append(dt)
                rec["collective_s"].append(seconds["step"])
                rec["collectives"].append(calls["step"])
    gathered = [None] * args.world_size
    dist.all_gather_object(gathered, records)
    if rank == 0:
        Path(out_path).write_text(json.dumps(gathered))
    # The DDP reducers hold the process group: dropped here, the group (and
    # its gloo threads) goes with destroy_process_group. Left to interpreter
    # exit, a gloo thread was sometimes destroyed unjoined, and the rank died
    # with SIGABRT ("terminate called without an active exception").
    del models, opts
    gc.collect()
    dist.destroy_process_group()


def spawn(worker, args: argparse.Namespace) -> list:
    """What rank 0 of args.world_size spawned processes, worker(rank, args,
    store, out_path), wrote to out_path as JSON (the ranks meet through the
    file store); killed after args.timeout seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = str(Path(tmp) / "records.json")
        ctx = mp.start_processes(worker, args=(args, str(Path(tmp) / "store"), out_path),
                                 nprocs=args.world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + args.timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise RuntimeError(f"the ranks ran past --timeout {args.timeout:.0f} s")
        return json.loads(Path(out_path).read_text())


def _quartiles(values: list) -> tuple:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[1], q[2]


def summarize(per_rank: list) -> dict:
    """Per variant: step time (slowest rank per step) and BN collective time
    (mean over ranks per step), median and quartiles in ms; the overhead, and
    where torch's SyncBatchNorm ran, bnfast's speed-up over it."""
    out = {}
    for name in per_rank[0]:
        steps = [max(ts) for ts in zip(*(r[name]["step_s"] for r in per_rank))]
        coll = [statistics.fmean(cs) for cs in zip(*(r[name]["collective_s"] for r in per_rank))]
        q1, med, q3 = _quartiles(steps)
        out[name] = {"median_step_ms": 1e3 * med, "q1_step_ms": 1e3 * q1, "q3_step_ms": 1e3 * q3,
                     "median_collective_ms": 1e3 * statistics.median(coll),
                     "collectives_per_step": statistics.median(per_rank[0][name]["collectives"]),
                     "fused_layers": per_rank[0][name]["fused_layers"],
                     "steps": len(steps), "step_ms": [1e3 * s for s in steps]}
    local, sync = out["local"], out["sync"]
    overhead = sync["median_step_ms"] / local["median_step_ms"] - 1
    paired = statistics.median(s / t for s, t in zip(sync["step_ms"], local["step_ms"])) - 1
    speedup = out["torch"]["median_step_ms"] / sync["median_step_ms"] if "torch" in out else None
    return {"variants": out, "overhead": overhead, "paired_overhead": paired, "speedup_vs_torch": speedup,
            "bar_overhead": BAR_OVERHEAD, "bar_met": overhead <= BAR_OVERHEAD}


def markdown(result: dict) -> str:
    s, o, m = result["summary"], result["options"], result["machine"]
    lines = [
        "# DDP benchmark: seed CNN, bnfast.SyncBatchNorm vs unsynchronized bnfast BN"
        + (" (both fused with relu: SyncBatchNormAct vs BatchNormAct2d)" if o.get("fuse") else ""),
        "",
        f"{m['cpu_model']} ({m['logical_cpus']} logical CPUs)"
        + (f", {m['gpu_name']}" if o["device"] == "cuda" else "") + f", torch {m['torch_version']}; "
        f"{o['world_size']} ranks ({o['backend']}, {o['device']}, {o['threads']} thread(s) each), "
        f"batch {o['batch']} per rank (global {o['batch'] * o['world_size']}), random CIFAR-shaped data; "
        f"{o['steps']} timed steps per variant after {o['warmup']} warm-up, interleaved.",
        "",
        "| variant | median step (ms) | IQR (ms) | BN collectives (ms / step) | BN collective calls / step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in s["variants"].items():
        # Only bnfast's collectives are timed; torch's SyncBatchNorm issues its own.
        collectives = ("n/a | n/a" if name == "torch"
                       else f"{v['median_collective_ms']:.2f} | {v['collectives_per_step']:.0f}")
        lines.append(f"| {name} | {v['median_step_ms']:.2f} | {v['q1_step_ms']:.2f}-{v['q3_step_ms']:.2f} | "
                     f"{collectives} |")
    verdict = "met" if s["bar_met"] else "NOT met"
    lines += [
        "",
        f"SyncBatchNorm step overhead: {100 * s['overhead']:+.1f}% (ratio of medians; median of the "
        f"paired per-step ratios {100 * s['paired_overhead']:+.1f}%). Bar: at most "
        f"+{100 * s['bar_overhead']:.0f}%"
        + (f" (a CPU bar; judged here on {o['device']}): {verdict}." if o["device"] != "cpu" else f": {verdict}."),
        "",
    ]
    if s["speedup_vs_torch"] is not None:
        lines += [f"bnfast.SyncBatchNorm step vs torch.nn.SyncBatchNorm step (torch's layers unfused): "
                  f"{s['speedup_vs_torch']:.2f}x (ratio of medians).", ""]
    lines += [
        f"Step time: the slowest rank's, per step. BN collectives: time inside bnfast.SyncBatchNorm's "
        f"all_gather / all_reduce calls, waiting for the other ranks included, mean over ranks. "
        f"Load average at start {m.get('load_average')}.",
    ]
    return "\n".join(lines) + "\n"


def run(options=None, **overrides) -> dict:
    """Run the benchmark; write ddp.json and ddp.md into options.out; return the results."""
    args = merge_options(build_parser(), options, overrides)
    if args.world_size < 2 or args.steps < 1:
        raise ValueError("--world-size must be >= 2 and --steps >= 1")
    resolve_backend(args)
    args.out = args.out or f"benchmarks/results/ddp-{args.device}"
    from benchmarks.train_cifar import machine_info

    machine = machine_info(args.device)
    machine["torch_threads"] = args.threads  # per rank
    t0 = time.perf_counter()
    per_rank = spawn(_worker, args)
    result = {"benchmark": "bnfast_ddp", "machine": machine, "options": vars(args),
              "summary": summarize(per_rank), "per_rank": per_rank, "elapsed_s": time.perf_counter() - t0}
    return write_results(result, args.out, "ddp", markdown)


def main(argv=None) -> int:
    return cli_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
