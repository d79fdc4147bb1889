"""Kernel benchmark: bnfast.BatchNorm*d vs torch.nn.BatchNorm*d, op by op.

For every case (shape) x dtype x memory format, both modules run in the same
process on the same input and are timed phase by phase:

  fwd_train  training-mode forward with autograd recording (as in a training
             step; includes the running-statistics update)
  fwd_eval   eval-mode forward under torch.no_grad() (running statistics)
  bwd        backward alone: the graph of one training forward is kept and
             torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True)
             is timed (grad, not .backward(), so accumulation into .grad adds
             no extra pass)
  fwd_bwd    training forward + torch.autograd.grad(y, (x, weight, bias), dy)

plus a copy of the same tensor (dst.copy_(x) into a preallocated tensor of
the same layout), the practical streaming bound of the machine.

``--fusions`` adds batch norm fused with what follows or precedes it, each
against torch's unfused modules on the same input: ``relu`` (torch: BN then
F.relu; bnfast: BatchNormAct*d(act="relu")), ``add_relu`` (relu(BN(x) + r),
the end of a residual block; r gets a gradient too) and ``pre_relu``
(BN(relu(x)), the seed CNN's order).

Timing (torch.utils.benchmark.Timer, which synchronizes CUDA): each timer is
warmed up and its block size (iterations per sample) picked by
Timer.blocked_autorange; then ``rounds`` measurement rounds follow, and in each
round every timer of the configuration takes one block, torch and bnfast in
alternating order (torch first in even rounds, bnfast first in odd ones). A
burst of load from elsewhere on a shared machine therefore hits both alike.
Reported: the median and interquartile range (IQR) over the blocks of the
per-iteration time.

Weight, bias and running statistics of a bfloat16 input are float32, as
under autocast (``--params input`` makes them bfloat16). On a GPU the default
case list adds the ~100 MB ResNet-50 stem and first stage.

Effective bandwidth uses the streaming model of DESIGN.md (N elements of s
bytes): fwd_train 3·N·s, fwd_eval 2·N·s, bwd 5·N·s, fwd_bwd 8·N·s, copy
2·N·s; a fused residual adds one pass to each phase (its read forward, the
write of its gradient backward). ``% copy`` is effective bandwidth / copy bandwidth.

Usage: ``python -m benchmarks.kernels [--device cpu|cuda] [--quick | --full]
[--out DIR] [--cases ...] [--dtypes ...] [--formats ...]`` (``-h`` for all).
Library use: ``run(options) -> dict`` with an argparse.Namespace or a dict.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import cli_main, merge_options, write_report

PHASES = ("fwd_train", "fwd_eval", "bwd", "fwd_bwd")
PHASE_TITLES = {"fwd_train": "fwd train", "fwd_eval": "fwd eval", "bwd": "bwd", "fwd_bwd": "fwd+bwd"}
# Streaming-model passes over an N*s-byte tensor (DESIGN.md, performance model).
PASSES = {"fwd_train": 3, "fwd_eval": 2, "bwd": 5, "fwd_bwd": 8}
COPY_PASSES = 2
# The residual's extra passes (read forward, its gradient written backward).
RESIDUAL_PASSES = {"fwd_train": 1, "fwd_eval": 1, "bwd": 1, "fwd_bwd": 2}
FUSIONS = ("none", "relu", "add_relu", "pre_relu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORMATS = ("nchw", "channels_last")
IMPLS = ("torch", "bnfast")


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    shape: tuple
    tier: str  # "quick" (also in default and full), "default" (also in full), "full"

    @property
    def module(self) -> str:
        return {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(self.shape)]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))


CASES = (
    # Seed CNN of the CIFAR-10 benchmark (batch 128): its three BN inputs.
    Case("seed_bn1", "seed CNN", (128, 32, 30, 30), "default"),
    Case("seed_bn2", "seed CNN", (128, 64, 13, 13), "quick"),
    Case("seed_bn3", "seed CNN", (128, 64, 4, 4), "quick"),
    # ResNet-18 on CIFAR-10, batch 128: one BN input per stage.
    Case("r18_s1", "ResNet-18 CIFAR", (128, 64, 32, 32), "default"),
    Case("r18_s2", "ResNet-18 CIFAR", (128, 128, 16, 16), "default"),
    Case("r18_s3", "ResNet-18 CIFAR", (128, 256, 8, 8), "default"),
    Case("r18_s4", "ResNet-18 CIFAR", (128, 512, 4, 4), "default"),
    Case("r18_b64_s2", "ResNet-18 CIFAR", (64, 128, 16, 16), "full"),  # stage 2 at batch 64
    # ResNet-50 on ImageNet, batch 32: stem and one bottleneck output per stage.
    Case("r50_stem", "ResNet-50 ImageNet", (32, 64, 112, 112), "full"),
    Case("r50_s1", "ResNet-50 ImageNet", (32, 256, 56, 56), "full"),
    Case("r50_s2", "ResNet-50 ImageNet", (32, 512, 28, 28), "default"),
    Case("r50_s3", "ResNet-50 ImageNet", (32, 1024, 14, 14), "default"),
    Case("r50_s3_mid", "ResNet-50 ImageNet", (32, 256, 14, 14), "full"),  # a stage-3 bottleneck's inner width
    Case("r50_s4", "ResNet-50 ImageNet", (32, 2048, 7, 7), "full"),
    # BatchNorm1d after a wide linear layer; BatchNorm3d in a video network.
    Case("mlp", "MLP (BatchNorm1d)", (256, 4096), "default"),
    Case("mlp_small", "MLP (BatchNorm1d)", (128, 1024), "quick"),
    Case("video", "video (BatchNorm3d)", (8, 64, 8, 28, 28), "default"),
    Case("video_small", "video (BatchNorm3d)", (4, 32, 4, 14, 14), "quick"),
)
CASE_BY_NAME = {c.name: c for c in CASES}
# Which tiers each selection includes.
TIERS = {"quick": ("quick",), "default": ("default",), "full": ("default", "full")}
# The small cases exist for --quick; the default and full runs use the real ones,
# except seed_bn2/seed_bn3, which are real seed-CNN shapes and belong everywhere.
QUICK_ALSO_DEFAULT = ("seed_bn2", "seed_bn3")
# On a GPU the default list also has the ~100 MB tensors (ResNet-50's stem
# and first stage at batch 32), where the streaming bound is judged.
CUDA_ALSO_DEFAULT = ("r50_stem", "r50_s1")

# Timing settings: rounds (blocks per timer), target block length, warm-up.
# A GPU's timings are steadier and its budget in the GPU check is ~90 s.
TIMING = {
    "default": {"rounds": 10, "block_s": 0.01, "warmup_s": 0.03},
    "quick": {"rounds": 8, "block_s": 0.002, "warmup_s": 0.005},
    "cuda": {"rounds": 8, "block_s": 0.004, "warmup_s": 0.01},
}
# Weight, bias and running statistics of a half / bfloat16 input: float32, as
# under autocast (mixed precision), or the input's dtype.
PARAM_DTYPES = ("float32", "input")


# ---------------------------------------------------------------------------
# Options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels",
        description="Time bnfast.BatchNorm*d against torch.nn.BatchNorm*d per phase "
                    "(training forward, eval forward, backward, forward+backward); "
                    "write JSON, a markdown table and a PNG chart.")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default %(default)s")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="a handful of small cases, short timing (CI smoke run, < ~30 s)")
    size.add_argument("--full", action="store_true",
                      help="every case, including the large ResNet-50 ones")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/kernels-<device>)")
    p.add_argument("--cases", nargs="+", default=None,
                   help="case names or groups (comma or space separated) instead of the "
                        "selection; names: " + ", ".join(CASE_BY_NAME))
    p.add_argument("--dtypes", nargs="+", default=None,
                   help=f"from {', '.join(DTYPES)} (default all)")
    p.add_argument("--formats", nargs="+", default=None,
                   help=f"from {', '.join(FORMATS)} (default all; channels_last means "
                        "channels_last_3d for 5-D inputs and does not apply to BatchNorm1d)")
    p.add_argument("--fusions", nargs="+", default=None,
                   help=f"from {', '.join(FUSIONS)} (default none: plain batch norm); each fused one "
                        "against torch's unfused modules")
    p.add_argument("--phases", nargs="+", default=None,
                   help=f"from {', '.join(PHASES)} (default all)")
    p.add_argument("--rounds", type=int, default=None,
                   help="measurement rounds = blocks per timer (default %d, quick %d)"
                        % (TIMING["default"]["rounds"], TIMING["quick"]["rounds"]))
    p.add_argument("--block-ms", type=float, default=None,
                   help="target length of one timed block in ms (default %g, quick %g)"
                        % (1e3 * TIMING["default"]["block_s"], 1e3 * TIMING["quick"]["block_s"]))
    p.add_argument("--params", default="float32", choices=PARAM_DTYPES,
                   help="dtype of weight, bias and running statistics for bfloat16 input: float32 "
                        "(mixed precision, as under autocast; default) or the input's dtype")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    p.add_argument("--quiet", action="store_true", help="no per-configuration progress lines")
    return p


def _split(values) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [s.strip() for v in values for s in str(v).split(",") if s.strip()]


def resolve_options(options=None, **overrides) -> argparse.Namespace:
    """Parser defaults <- options (Namespace or dict) <- overrides; lists parsed and checked."""
    args = merge_options(build_parser(), options, overrides)
    if args.quick and args.full:
        raise ValueError("--quick and --full exclude each other")
    args.selection = "quick" if args.quick else "full" if args.full else "default"
    args.cases = select_cases(_split(args.cases), args.selection, args.device)
    args.dtypes = _split(args.dtypes) or list(DTYPES)
    args.formats = _split(args.formats) or list(FORMATS)
    args.phases = _split(args.phases) or list(PHASES)
    args.fusions = _split(args.fusions) or ["none"]
    for name, got, allowed in (("dtype", args.dtypes, DTYPES), ("format", args.formats, FORMATS),
                               ("phase", args.phases, PHASES), ("fusion", args.fusions, FUSIONS)):
        bad = [g for g in got if g not in allowed]
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; choose from {list(allowed)}")
    timing = TIMING["quick" if args.quick else "cuda" if args.device == "cuda" else "default"]
    args.rounds = args.rounds or timing["rounds"]
    args.block_s = args.block_ms / 1e3 if args.block_ms else timing["block_s"]
    args.warmup_s = timing["warmup_s"]
    if args.rounds < 1 or args.block_s <= 0:
        raise ValueError("--rounds must be >= 1 and --block-ms > 0")
    if args.out is None:
        args.out = str(Path(__file__).resolve().parent / "results" / f"kernels-{args.device}")
    return args


def select_cases(names: list[str], selection: str, device: str = "cpu") -> list[Case]:
    if not names:
        tiers = TIERS[selection]
        return [c for c in CASES if c.tier in tiers
                or (selection != "quick" and c.name in QUICK_ALSO_DEFAULT)
                or (selection == "default" and device == "cuda" and c.name in CUDA_ALSO_DEFAULT)]
    out = []
    for n in names:
        hits = [CASE_BY_NAME[n]] if n in CASE_BY_NAME else [
            c for c in CASES if c.group.lower().startswith(n.lower())]
        if not hits:
            raise ValueError(f"unknown case {n!r}; choose from {list(CASE_BY_NAME)} "
                             f"or a group ({sorted({c.group for c in CASES})})")
        out += [c for c in hits if c not in out]
    return out


# ---------------------------------------------------------------------------
# Machine


def machine_info(device: str) -> dict:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": cpu or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # bnfast follows ATen's run-time choice (csrc/cpu/dispatch.cpp).
        "bnfast_cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "device": device,
        "gpu_name": None,
        "cuda_version": torch.version.cuda,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------
# Measurement


def _module_class(impl: str, case: Case, fusion: str = "none"):
    if impl == "torch":
        return getattr(torch.nn, case.module)
    import bnfast
    return getattr(bnfast, case.module.replace("BatchNorm", "BatchNormAct") if fusion != "none" else case.module)


def _fused_forward(impl: str, fusion: str, module, residual):
    """module(x) as the configuration computes it: torch's unfused sequence or bnfast's fused module."""
    import torch.nn.functional as F
    if impl == "bnfast" or fusion == "none":
        return (lambda x: module(x, residual)) if fusion == "add_relu" else module
    return {"relu": lambda x: F.relu(module(x)), "add_relu": lambda x: F.relu(module(x) + residual),
            "pre_relu": lambda x: module(F.relu(x))}[fusion]


def _memory_format(fmt: str, ndim: int):
    if fmt == "nchw":
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)


def format_label(fmt: str, ndim: int) -> str:
    if fmt == "nchw":
        return "contiguous" if ndim < 4 else "NCHW" if ndim == 4 else "NCDHW"
    return "channels_last" if ndim == 4 else "channels_last_3d"


def _stats(samples_s: list[float]) -> dict:
    """Median and quartiles, in ms, of per-iteration times (one per block)."""
    ms = sorted(1e3 * t for t in samples_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": ms[0], "n_blocks": len(ms)}


def _closures(impl: str, case: Case, x: torch.Tensor, dy: torch.Tensor, phases,
              param_dtype: torch.dtype, fusion: str = "none", residual=None) -> tuple[dict, dict]:
    """{phase: zero-argument callable} for one implementation, and check tensors."""
    cls = _module_class(impl, case, fusion)
    c = case.shape[1]
    kwargs = {"act": "relu" if fusion == "add_relu" else fusion} if impl == "bnfast" and fusion != "none" else {}
    torch.manual_seed(1)
    train = cls(c, **kwargs).to(device=x.device, dtype=param_dtype)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        train.weight.uniform_(0.5, 1.5)
        train.bias.uniform_(-0.5, 0.5)
        train.running_mean.uniform_(-0.1, 0.1)
        train.running_var.uniform_(0.5, 1.5)
    ev = cls(c, **kwargs).to(device=x.device, dtype=param_dtype)
    ev.load_state_dict(train.state_dict())
    ev.eval()
    params = (x, train.weight, train.bias) + ((residual,) if residual is not None else ())
    train_fn, eval_fn = (_fused_forward(impl, fusion, m, residual) for m in (train, ev))

    # Outputs and gradients once, for the torch-vs-bnfast agreement check;
    # the kept graph is the one the bwd phase differentiates again and again.
    y = train_fn(x)
    grads = torch.autograd.grad(y, params, dy, retain_graph=True)
    with torch.no_grad():
        y_eval = eval_fn(x)
    check = {"y": y.detach(), "dx": grads[0], "dw": grads[1], "db": grads[2], "y_eval": y_eval}
    if residual is not None:
        check["dr"] = grads[3]

    def fwd_train():
        return train_fn(x)

    def fwd_eval():
        with torch.no_grad():
            return eval_fn(x)

    def bwd():
        return torch.autograd.grad(y, params, dy, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(train_fn(x), params, dy)

    fns = {"fwd_train": fwd_train, "fwd_eval": fwd_eval, "bwd": bwd, "fwd_bwd": fwd_bwd}
    return {p: fns[p] for p in phases}, check


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_config(case: Case, dtype_name: str, fmt: str, device: str, phases, *,
                 rounds: int, block_s: float, warmup_s: float, seed: int = 0, params: str = "float32",
                 fusion: str = "none") -> dict:
    """Time one (case, dtype, format) configuration; a dict with one row per phase."""
    from torch.utils.benchmark import Timer

    dtype = DTYPES[dtype_name]
    mf = _memory_format(fmt, len(case.shape))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=g).to(device=device, dtype=dtype, memory_format=mf)
    x = (3 * x + 1).requires_grad_()  # mean and variance away from 0 and 1
    dy = torch.randn(case.shape, generator=g).to(device=device, dtype=dtype, memory_format=mf)
    residual = None
    if fusion == "add_relu":
        residual = torch.randn(case.shape, generator=g).to(device=device, dtype=dtype, memory_format=mf)
        residual.requires_grad_()
    dst = torch.empty_like(x, requires_grad=False)
    xd = x.detach()

    param_dtype = torch.float32 if params == "float32" and dtype != torch.float64 else dtype
    fns, checks = {}, {}
    for impl in IMPLS:
        fns[impl], checks[impl] = _closures(impl, case, x, dy, phases, param_dtype, fusion, residual)
    agreement = {k: _rel_err(checks["bnfast"][k], checks["torch"][k]) for k in checks["torch"]}
    del checks

    threads = torch.get_num_threads()
    timers = {("copy", "copy"): Timer("f()", globals={"f": lambda: dst.copy_(xd)}, num_threads=threads),
              # clone = allocate + copy: shows what a fresh output costs (page faults
              # when the allocator returns new memory), which every BN call pays too.
              ("clone", "clone"): Timer("f()", globals={"f": xd.clone}, num_threads=threads)}
    for phase in phases:
        for impl in IMPLS:
            timers[(phase, impl)] = Timer("f()", globals={"f": fns[impl][phase]}, num_threads=threads)

    # Warm-up and block size: blocked_autorange, then blocks of `number`
    # iterations lasting about block_s each.
    number = {}
    for key, t in timers.items():
        m = t.blocked_autorange(min_run_time=warmup_s)
        per_iter = max(m.median, 1e-9)
        number[key] = max(1, round(block_s / per_iter))

    samples = {key: [] for key in timers}
    for r in range(rounds):
        order = [("copy", "copy"), ("clone", "clone")] if r % 2 == 0 else [("clone", "clone"), ("copy", "copy")]
        for phase in phases:
            pair = [(phase, "torch"), (phase, "bnfast")]
            order += pair if r % 2 == 0 else pair[::-1]
        for key in order:
            m = timers[key].timeit(number[key])
            samples[key].append(m.mean)  # per-iteration time of this block

    nbytes = case.numel * x.element_size()
    copy = _stats(samples[("copy", "copy")])
    copy_gbps = COPY_PASSES * nbytes / (copy["median_ms"] * 1e-3) / 1e9
    clone = _stats(samples[("clone", "clone")])
    clone_gbps = COPY_PASSES * nbytes / (clone["median_ms"] * 1e-3) / 1e9
    rows = []
    for phase in phases:
        t, b = _stats(samples[(phase, "torch")]), _stats(samples[(phase, "bnfast")])
        passes = PASSES[phase] + (RESIDUAL_PASSES[phase] if residual is not None else 0)
        bytes_model = passes * nbytes
        t_gbps = bytes_model / (t["median_ms"] * 1e-3) / 1e9
        b_gbps = bytes_model / (b["median_ms"] * 1e-3) / 1e9
        rows.append({
            "case": case.name, "group": case.group, "module": case.module,
            "shape": list(case.shape), "dtype": dtype_name, "format": fmt,
            "format_label": format_label(fmt, len(case.shape)), "fusion": fusion, "phase": phase,
            "numel": case.numel, "elem_bytes": x.element_size(), "passes": passes,
            "model_bytes": bytes_model,
            "torch": t, "bnfast": b, "copy": copy, "clone": clone, "clone_gbps": clone_gbps,
            "speedup": t["median_ms"] / b["median_ms"],
            # From the fastest blocks: steadier than the median on a busy machine.
            "speedup_min": t["min_ms"] / b["min_ms"],
            "torch_gbps": t_gbps, "bnfast_gbps": b_gbps, "copy_gbps": copy_gbps,
            "torch_frac_copy": t_gbps / copy_gbps, "bnfast_frac_copy": b_gbps / copy_gbps,
            "iters_per_block": {"torch": number[(phase, "torch")], "bnfast": number[(phase, "bnfast")]},
        })
    return {"case": case.name, "dtype": dtype_name, "format": fmt, "fusion": fusion, "copy": copy,
            "copy_gbps": copy_gbps, "clone": clone, "clone_gbps": clone_gbps, "copy_iters_per_block": number[("copy", "copy")],
            "agreement_rel_err": agreement, "rows": rows}


# ---------------------------------------------------------------------------
# Reports


def geomean(values) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def summarize(rows: list[dict]) -> dict:
    """Geometric-mean speed-ups per phase, per dtype x phase, and overall."""
    out = {"by_phase": {}, "by_dtype_phase": {}, "overall": geomean(r["speedup"] for r in rows),
           "slower_configs": sum(1 for r in rows if r["speedup"] < 1.0), "rows": len(rows)}
    for p in PHASES:
        sel = [r for r in rows if r["phase"] == p]
        if sel:
            out["by_phase"][p] = geomean(r["speedup"] for r in sel)
            out.setdefault("by_phase_min", {})[p] = geomean(r["speedup_min"] for r in sel)
        for d in DTYPES:
            sel_d = [r for r in sel if r["dtype"] == d]
            if sel_d:
                out["by_dtype_phase"].setdefault(d, {})[p] = geomean(r["speedup"] for r in sel_d)
    return out


def _config_key(r: dict) -> tuple:
    return r["case"], r["dtype"], r["format"], r.get("fusion", "none")


FUSION_LABELS = {"none": "BN", "relu": "BN -> relu", "add_relu": "BN + add -> relu", "pre_relu": "relu -> BN"}


def _fused(rows) -> bool:
    return any(r.get("fusion", "none") != "none" for r in rows)


def speedup_table(result: dict) -> str:
    """Compact markdown: one line per (case, dtype, format), speed-up per phase."""
    rows = result["rows"]
    phases = [p for p in PHASES if any(r["phase"] == p for r in rows)]
    by = {}
    for r in rows:
        by.setdefault(_config_key(r), {})[r["phase"]] = r
    fused = _fused(rows)
    head = ["case", "shape", "dtype", "format"] + (["computes"] if fused else [])
    key_columns = len(head)
    head += [f"{PHASE_TITLES[p]} x" for p in phases]
    last = "fwd_bwd" if "fwd_bwd" in phases else phases[-1]
    head += [f"{PHASE_TITLES[last]} ms torch / bnfast", f"{PHASE_TITLES[last]} % copy torch / bnfast"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * key_columns + "---:|" * (len(head) - key_columns)]
    for key, ph in by.items():
        any_r = next(iter(ph.values()))
        cells = [any_r["case"], "x".join(map(str, any_r["shape"])), any_r["dtype"], any_r["format_label"]]
        cells += [FUSION_LABELS[any_r.get("fusion", "none")]] if fused else []
        cells += [f"{ph[p]['speedup']:.2f}" if p in ph else "-" for p in phases]
        lr = ph.get(last)
        cells += [f"{lr['torch']['median_ms']:.3f} / {lr['bnfast']['median_ms']:.3f}" if lr else "-",
                  f"{100 * lr['torch_frac_copy']:.0f}% / {100 * lr['bnfast_frac_copy']:.0f}%" if lr else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    s = result["summary"]
    geo = ", ".join(f"{PHASE_TITLES[p]} {v:.2f}x" for p, v in s["by_phase"].items())
    lines += ["", f"Geometric-mean speed-up (torch time / bnfast time): {geo}; "
              f"overall {s['overall']:.2f}x; bnfast slower in {s['slower_configs']} of {s['rows']} "
              "measurements." if s["overall"] else "No measurements."]
    if s.get("by_phase_min"):
        lines.append("From the fastest blocks (steadier on a busy machine): " + ", ".join(
            f"{PHASE_TITLES[p]} {v:.2f}x" for p, v in s["by_phase_min"].items()) + ".")
    return "\n".join(lines)


def detail_table(result: dict) -> str:
    fused = _fused(result["rows"])
    head = ["case", "shape", "dtype", "format"] + (["computes"] if fused else []) + [
        "phase", "torch ms (IQR)", "bnfast ms (IQR)", "speed-up", "speed-up (min)", "torch GB/s", "bnfast GB/s",
        "copy GB/s", "clone GB/s", "torch % copy", "bnfast % copy"]
    key_columns = 6 if fused else 5
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * key_columns + "---:|" * (len(head) - key_columns)]
    for r in result["rows"]:
        t, b = r["torch"], r["bnfast"]
        lines.append("| " + " | ".join([
            r["case"], "x".join(map(str, r["shape"])), r["dtype"], r["format_label"]]
            + ([FUSION_LABELS[r.get("fusion", "none")]] if fused else []) + [PHASE_TITLES[r["phase"]],
            f"{t['median_ms']:.3f} ({t['iqr_ms']:.3f})", f"{b['median_ms']:.3f} ({b['iqr_ms']:.3f})",
            f"{r['speedup']:.2f}x", f"{r['speedup_min']:.2f}x", f"{r['torch_gbps']:.1f}", f"{r['bnfast_gbps']:.1f}",
            f"{r['copy_gbps']:.1f}", f"{r['clone_gbps']:.1f}", f"{100 * r['torch_frac_copy']:.0f}%",
            f"{100 * r['bnfast_frac_copy']:.0f}%"]) + " |")
    return "\n".join(lines)


def busy_note(result: dict) -> str | None:
    """A warning when the machine was busy (1-min load average above its CPU count)."""
    m = result["machine"]
    loads = [l[0] for l in (m.get("load_average"), result.get("load_average_end")) if l]
    cpus = m.get("logical_cpus") or 1
    if result["device"] == "cpu" and loads and max(loads) > 1.25 * cpus:
        return (f"The machine was busy (1-min load average up to {max(loads):.1f} on {cpus} logical "
                "CPUs, this run included): CPU times are noisy; compare with care or rerun on a "
                "quiet machine.")
    return None


def markdown(result: dict) -> str:
    m, o = result["machine"], result["options"]
    dev = m["gpu_name"] if result["device"] == "cuda" else m["cpu_model"]
    lines = [f"# Kernel benchmark: bnfast vs torch.nn.BatchNorm*d ({result['device']})", "",
             f"Machine: {dev}; {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads, "
             f"torch {m['torch_version']}, CPU ISA (ATen's choice, followed by bnfast): "
             f"{m['bnfast_cpu_isa']}."
             + (f" Load average at start: {', '.join(f'{v:.1f}' for v in m['load_average'])}."
                if m.get("load_average") else ""),
             f"Selection: {o['selection']}; {o['rounds']} interleaved rounds, blocks of ~{1e3 * o['block_s']:g} ms; "
             "times are medians over blocks of the per-iteration time; parameters in the input dtype.",
             ]
    busy = busy_note(result)
    if busy:
        lines += ["", f"**{busy}**"]
    lines += ["", "## Speed-up (torch time / bnfast time, > 1: bnfast faster)", "",
             speedup_table(result), "",
             "## Details", "",
             "Effective bandwidth against the streaming model (N elements of s bytes): fwd train 3·N·s, "
             "fwd eval 2·N·s, bwd 5·N·s, fwd+bwd 8·N·s; copy = dst.copy_(x) into a preallocated "
             "tensor, 2·N·s; clone = x.clone(), the same plus a fresh allocation, as every BN output "
             "needs (when clone is much slower than copy, allocation/page faults dominate). "
             "% copy = effective bandwidth / copy bandwidth. speed-up (min) compares the fastest "
             "blocks, a steadier estimate than the median when the machine is busy.", "",
             detail_table(result)]
    worst = max(result["configs"], key=lambda c: max(c["agreement_rel_err"].values()), default=None)
    if worst:
        k, v = max(worst["agreement_rel_err"].items(), key=lambda kv: kv[1])
        lines += ["", f"Agreement check (max relative error bnfast vs torch over outputs and "
                  f"gradients): worst {v:.2e} ({k}, {worst['case']} {worst['dtype']} {worst['format']} "
                  f"{FUSION_LABELS[worst.get('fusion', 'none')]})."]
        if _fused(result["rows"]):
            lines.append("Fused configurations in half precision differ from torch's unfused modules where "
                         "an element's pre-activation is near 0: torch rounds BN's output before the add "
                         "and the activation, bnfast rounds once at the end, so the relu mask (and with it "
                         "that element's gradient) can differ; tests/test_fused_act.py checks both against "
                         "float64.")
    if result.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> str | None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = result["rows"]
    if not rows:
        return None
    phases = [p for p in PHASES if any(r["phase"] == p for r in rows)]
    configs = list(dict.fromkeys(_config_key(r) for r in rows))
    by = {(_config_key(r), r["phase"]): r["speedup"] for r in rows}
    labels = [f"{c} {d} {'CL' if f == 'channels_last' else ''} {'' if u == 'none' else FUSION_LABELS[u]}".strip()
              for c, d, f, u in configs]
    fig, axes = plt.subplots(1, len(phases), figsize=(3.2 * len(phases) + 2.5, 0.28 * len(configs) + 1.6),
                             sharey=True, squeeze=False)
    ys = range(len(configs))
    for ax, p in zip(axes[0], phases):
        vals = [by.get((c, p), 1.0) for c in configs]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in vals]
        # Log scale, bars from 1: 2x faster and 2x slower look alike.
        ax.barh(list(ys), [v - 1.0 for v in vals], left=1.0, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        lo, hi = min(vals + [0.5]), max(vals + [2.0])
        ax.set_xlim(lo / 1.5, hi * 1.5)
        for y, v in zip(ys, vals):
            ax.text(v * (1.05 if v >= 1 else 0.95), y, f"{v:.2f}", va="center",
                    ha="left" if v >= 1 else "right", fontsize=6)
        ax.set_title(PHASE_TITLES[p])
        ax.set_xlabel("speed-up, torch / bnfast (log)")
        ax.grid(axis="x", alpha=0.3, which="both")
    axes[0][0].set_yticks(list(ys), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    m = result["machine"]
    dev = m["gpu_name"] if result["device"] == "cuda" else f"{m['cpu_model']}, {m['torch_threads']} threads"
    fig.suptitle(f"bnfast vs torch BatchNorm, {result['device']} ({dev}); CL = channels_last", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------
# Entry points


def run(options=None, **overrides) -> dict:
    """Run the benchmark; write JSON, markdown and PNG into options.out; return the results."""
    args = resolve_options(options, **overrides)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    import bnfast  # noqa: F401  (fail early: the ops must be registered)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.device)
    configs, errors = [], []
    todo = []
    for case in args.cases:
        for dt in args.dtypes:
            for fmt in args.formats:
                if fmt == "channels_last" and len(case.shape) < 4:
                    continue  # BatchNorm1d: (N, C) is channels-last already
                todo += [(case, dt, fmt, fusion) for fusion in args.fusions]
    t_start = time.perf_counter()
    for i, (case, dt, fmt, fusion) in enumerate(todo):
        t0 = time.perf_counter()
        try:
            cfg = bench_config(case, dt, fmt, args.device, args.phases, rounds=args.rounds,
                               block_s=args.block_s, warmup_s=args.warmup_s, seed=args.seed,
                               params=args.params, fusion=fusion)
        except Exception as e:  # e.g. bnfast built without kernels for this device
            errors.append(f"{case.name} {dt} {fmt} {fusion}: {type(e).__name__}: {e}")
            print(f"error: {errors[-1]}", file=sys.stderr)
            continue
        configs.append(cfg)
        if not args.quiet:
            sp = "  ".join(f"{PHASE_TITLES[r['phase']]} {r['speedup']:.2f}x" for r in cfg["rows"])
            print(f"[{i + 1}/{len(todo)}] {case.name:11s} {case.shape_str:17s} {dt:8s} "
                  f"{format_label(fmt, len(case.shape)):16s} {FUSION_LABELS[fusion]:16s} {sp}  ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    rows = [r for c in configs for r in c["rows"]]
    try:
        load_end = os.getloadavg()
    except OSError:
        load_end = None
    options = {k: v for k, v in vars(args).items() if k != "cases"}
    options["cases"] = [c.name for c in args.cases]
    result = {"benchmark": "bnfast_kernels", "device": args.device, "machine": machine,
              "load_average_end": load_end, "options": options,
              "timing": {"method": "torch.utils.benchmark.Timer: blocked_autorange warm-up picks "
                                   "iterations per block; then rounds of Timer.timeit(block), torch and "
                                   "bnfast alternating order each round; median/IQR over blocks",
                         "rounds": args.rounds, "block_s": args.block_s},
              "model_passes": dict(PASSES, copy=COPY_PASSES), "configs": configs, "rows": rows,
              "errors": errors, "summary": summarize(rows),
              "elapsed_s": time.perf_counter() - t_start}
    files = {"json": str(out / "kernels.json"), "markdown": str(out / "kernels.md"), "plot": None}
    result["files"] = files
    if not args.no_plot:
        files["plot"] = plot(result, out / "kernels_speedup.png")
    write_report(result, files["json"], files["markdown"], markdown(result))
    return result


def main(argv=None) -> int:
    # Failed: every configuration errored.
    return cli_main(run, build_parser().parse_args(argv), failed=lambda r: bool(r["errors"] and not r["rows"]))


if __name__ == "__main__":
    sys.exit(main())
