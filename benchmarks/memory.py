"""Peak memory of one training step: torch's BN, bnfast fused
(convert(fuse=True)) and bnfast fused with memory_efficient=True.

    python -m benchmarks.memory --device cpu  --model seed
    python -m benchmarks.memory --device cuda --model resnet50 --act leaky_relu --dtype bfloat16 --channels-last

Each variant runs in a fresh subprocess from the same initial weights and
batch, two steps (forward, backward, SGD); per variant it reports
- peak: the step's peak memory above what was held before it. CUDA: torch's
  allocator (max_memory_allocated); CPU: the process's peak resident set
  (VmHWM, reset before the first step; glibc is told to mmap every block
  above 64 KiB, so it follows live tensor memory) above its size then;
- saved: the bytes of the distinct storages autograd keeps for backward at the
  end of the forward (saved-tensor hooks; parameters included);
- loss: the first step's loss, which must not depend on the variant.
On the CPU every variant runs twice by default (--cpu-caches): with bnfast's
output cache as it is by default, and with it off (BNFAST_CPU_CACHE_MB=0),
since the buffers it keeps idle for reuse count in the resident set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("torch", "fused", "memory_efficient")
CPU_CACHES = ("default", "off")  # bnfast's CPU output cache as it is by default, and BNFAST_CPU_CACHE_MB=0
MODELS = ("seed", "resnet18", "resnet50")


def build(model: str, act: str) -> nn.Module:
    from benchmarks.train_cifar import build_model
    net = build_model(model, dropout=0.0) if model == "seed" else build_model(model)
    if act == "leaky_relu":
        for module in list(net.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.ReLU):
                    setattr(module, name, nn.LeakyReLU(0.01, inplace=child.inplace))
    return net


def _saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x).float(), y)
    return loss, sum(sizes.values())


def measure(options: argparse.Namespace) -> dict:
    """One variant, in this process."""
    device = torch.device(options.device)
    dtype = getattr(torch, options.dtype)
    torch.manual_seed(0)
    model = build(options.model, options.act)
    if options.variant != "torch":
        import bnfast
        model = bnfast.convert(model, fuse=True, memory_efficient=options.variant == "memory_efficient")
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    model = model.to(device=device, dtype=dtype, memory_format=memory_format)
    size = 32 if options.model != "resnet50" else options.image_size
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(options.batch_size, 3, size, size, generator=generator).to(device, dtype)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (options.batch_size,), generator=generator).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses, saved = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _rss_bytes()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss, kept = _saved_bytes(model, x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        saved.append(kept)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _peak_rss_bytes() - before
    return {"variant": options.variant, "loss": losses[0], "peak_MiB": peak / 2**20, "saved_MiB": saved[0] / 2**20,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def _measuring_env(cpu_cache_off: bool) -> dict:
    """glibc serves blocks above 64 KiB by mmap and gives them back when
    freed, so the resident set follows live tensor memory (by default its
    mmap threshold grows with the blocks freed, and freed tensors stay resident)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    if cpu_cache_off:
        env["BNFAST_CPU_CACHE_MB"] = "0"
    return env


def _reset_peak_rss() -> None:
    """Start the process's peak resident set (VmHWM) afresh from its current
    size (Linux >= 4.0). Without it, VmHWM still counts from this process's
    exec; ru_maxrss would not do: it keeps the parent's peak across exec."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="seed", choices=MODELS)
    p.add_argument("--act", default="relu", choices=("relu", "leaky_relu"),
                   help="the ResNets' activation (the seed CNN's relu -> BN is fused as pre_relu either way)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224, help="ResNet-50's input size (default %(default)s)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--cpu-caches", nargs="+", default=list(CPU_CACHES), choices=CPU_CACHES,
                   help="CPU: measure with bnfast's output cache as it is by default, and off (default both)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--bar", type=float, default=None, metavar="FRACTION",
                   help="exit 1 unless memory_efficient cuts the fused step's peak by at least FRACTION "
                        "(with bnfast's defaults) at the same loss (issue 11: 0.25 on ResNet-50 leaky_relu, CUDA)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in this process (the subprocess)
    return p


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| variant | bnfast CPU cache | peak (MiB) | vs torch | kept for backward (MiB) | loss |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['cpu_cache']} | {r['peak_MiB']:.1f} | {r['peak_vs_first']:.2f}x | "
                     f"{r['saved_MiB']:.1f} | {r['loss']:.6f} |")
    return f"On {rows[0]['device']}.\n\n" + "\n".join(lines)


def judge(rows: list[dict], fraction: float) -> tuple[str, bool]:
    """Whether memory_efficient cuts fused's peak by fraction at the same loss (default settings)."""
    by = {r["variant"]: r for r in rows if r["cpu_cache"] == "default"}
    if "fused" not in by or "memory_efficient" not in by:
        return "memory bar: NO ROWS (needs the fused and memory_efficient variants)", False
    fused, saving = by["fused"], by["memory_efficient"]
    cut = 1 - saving["peak_MiB"] / fused["peak_MiB"]
    same_loss = abs(saving["loss"] - fused["loss"]) <= 1e-3 * abs(fused["loss"])
    met = cut >= fraction and same_loss
    return (f"memory bar: {'met' if met else 'NOT met'}: memory_efficient cuts the peak by {cut:.1%} "
            f"(need >= {fraction:.0%}), loss {saving['loss']:.6f} vs {fused['loss']:.6f}"), met


def main(argv=None) -> list[dict]:
    options = build_parser().parse_args(argv)
    if options.variant:
        print(json.dumps(measure(options)))
        return []
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    caches = options.cpu_caches if options.device == "cpu" else ("default",)

    def run(cache, variant):
        # A fresh process per variant: CPU peak RSS is a process-wide
        # high-water mark. Nothing here is timed, so on the CPU they may run
        # side by side.
        env = _measuring_env(cpu_cache_off=cache == "off")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", *forwarded, "--variant", variant],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory variant {variant} (cache {cache}) failed:\n{proc.stderr[-4000:]}")
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "cpu_cache": cache}

    jobs = [(cache, variant) for cache in caches for variant in options.variants]
    # On CUDA one at a time: processes sharing the GPU would change what each
    # can allocate (and cuDNN's choice of algorithms with it).
    workers = 1 if options.device == "cuda" else min(len(jobs), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        rows = list(pool.map(lambda job: run(*job), jobs))
    print(f"{options.model} ({options.act}, {options.dtype}{', channels_last' if options.channels_last else ''}, "
          f"batch {options.batch_size}) on {rows[0]['device']}: peak memory of a training step")
    for row in rows:
        base = next(r for r in rows if r["cpu_cache"] == row["cpu_cache"])
        row["peak_vs_first"] = row["peak_MiB"] / base["peak_MiB"]
        cache = f"  (bnfast CPU cache {row['cpu_cache']})" if options.device == "cpu" else ""
        print(f"  {row['variant']:<17} peak {row['peak_MiB']:8.1f} MiB ({row['peak_vs_first']:.2f}x)   "
              f"saved for backward {row['saved_MiB']:8.1f} MiB   loss {row['loss']:.6f}{cache}")
    verdict = None
    if options.bar is not None:
        text, verdict = judge(rows, options.bar)
        print(text)
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps({"options": {k: v for k, v in vars(options).items()
                                                             if k != "variant"}, "rows": rows,
                                                 "bar_met": verdict}, indent=1))
    if verdict is False:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
