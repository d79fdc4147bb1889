"""CIFAR-10 training benchmark: torch.nn.BatchNorm2d vs bnfast, on the CPU or a GPU.

Networks (``--models``): the seed CNN (with its conv-BN-ReLU variant,
``--variants``), the CIFAR-10 ResNet-18 and torchvision's ResNet-50 at 224 px
(benchmarks/models.py). ResNet-50 is timing only: it trains on random 224x224
batches and never reports an accuracy.

For each network the same model (same seed, same initial weights, same data
order, same dropout masks) is trained with torch's BatchNorm2d, after
``bnfast.convert`` (``--fuse``: ``bnfast.convert(model, fuse=True)``) and
without BN (the no-BN control: the seed CNN's ``no_bn`` variant, or the ResNet
with its BN layers replaced by identities). All runs of a network step in
lockstep on the same batches, so load from elsewhere on a shared machine hits
them alike, and their per-step losses can be compared. Step times cover only
zero_grad/forward/loss/backward/optimizer step (on CUDA between two
``torch.cuda.synchronize()``), not batch preparation or evaluation.

Each (network, precision, batch size) is trained once per seed (``--seeds``):
fp32 (NCHW) or bf16 (``torch.autocast`` to bfloat16, model and inputs
channels_last). The report gives the median step time, the speed-up
torch/bnfast, the no-BN ceiling (torch step / no-BN step: the most any BN
could gain), test accuracy per seed and as mean ± std [min, max] over seeds,
of each implementation and of the bnfast - torch difference, and beside it the
per-step loss agreement of the lockstep runs, |loss_torch - loss_bnfast|
(at the first step, median and max over steps, and at the last step).

``--timing-only`` times ``--steps`` steps on random batches (no data set
needed); without ``--models/--precision/--batch-size`` it runs the rows of the
H200 reference table (TIMING_ROWS).

Usage: ``python -m benchmarks.train_cifar --out DIR [--epochs N] [--quick] ...``
(``python -m benchmarks.train_cifar -h`` for all options). Library use:
``run(options) -> dict`` with an ``argparse.Namespace`` or a dict of options.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from benchmarks import cifar10, merge_options, write_report
from benchmarks.models import resnet18_cifar, resnet50, strip_bn

VARIANTS = ("seed", "conv_bn_relu", "no_bn")  # the seed CNN's
RESNETS = {"resnet18": resnet18_cifar, "resnet50": resnet50}
MODELS = ("seed",) + tuple(RESNETS)
IMPLS = ("torch", "bnfast")
NO_BN = "no_bn"  # the impl of a no-BN control run
PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")
# ResNet-50 is an ImageNet network: 1000 classes, trained here on random data only.
TIMING_ONLY_MODELS = ("resnet50",)
NUM_CLASSES = {"seed": 10, "resnet18": 10, "resnet50": 1000}
# This benchmark's own default is the full 10-epoch run. The suite
# (python -m benchmarks) trains SUITE_EPOCHS instead, so that it takes ~12-16
# min with the kernel benchmark on a 2-core CPU: on an idle 2-core AMD EPYC the
# five runs take ~68 s per epoch (steps of 24-32 ms, ~2 s per 10k-image eval),
# so 5 epochs is ~6 min. NB: one run's test accuracy moves by a few points
# from epoch to epoch, so a 5-epoch single-seed difference does not resolve 1
# point; the 10-epoch runs over several seeds do.
FULL_EPOCHS = 10
DEFAULT_EPOCHS = FULL_EPOCHS
SUITE_EPOCHS = 5
BATCH_SIZE = 128
DEFAULT_BATCH = {"seed": BATCH_SIZE, "resnet18": BATCH_SIZE, "resnet50": 64}
RESNET50_SIZE = 224
# The rows of the H200 reference table (issue 9; torch 2.11 eager, Adam):
# (model, precision, batch). What --timing-only runs unless told otherwise.
TIMING_ROWS = (("seed", "fp32", 128), ("seed", "fp32", 1024), ("resnet18", "fp32", 256),
               ("resnet18", "bf16", 256), ("resnet50", "bf16", 64))
# Acceptance bars for the seed CNN on CPU: the step speed-up of the plain
# swap (issue #3) and of bnfast.convert(model, fuse=True) (issue #11); the
# same accuracy bar for both.
BAR_SPEEDUP = 1.35
BAR_SPEEDUP_FUSED = 1.3
BAR_ACC_POINTS = 1.0
QUICK = {"subset": 2048, "test_subset": 2000, "epochs": 1, "steps": 20}
SYNTHETIC_STEPS = 100
PREFIX = "cifar10_"
CPU_SHARE_WARN = 0.7


class Case(NamedTuple):
    """One row of the benchmark: a network at one precision and input size."""
    model: str
    precision: str
    batch_size: int
    image_size: int


# ---------------------------------------------------------------------------
# Model

def build_model(variant: str = "seed", dropout: float = 0.5) -> nn.Module:
    """The seed CNN, or a ResNet (variant resnet18 / resnet50, benchmarks.models).
    The seed CNN's BN inputs at batch 128: 32x30x30, 64x13x13, 64x4x4."""
    if variant in RESNETS:
        return RESNETS[variant]()
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS + tuple(RESNETS)}")
    layers: list[nn.Module] = []
    c_in = 3
    for c_out, pool in ((32, True), (64, True), (64, False)):
        layers.append(nn.Conv2d(c_in, c_out, 3))
        if variant == "seed":
            layers += [nn.ReLU(), nn.BatchNorm2d(c_out)]
        elif variant == "conv_bn_relu":
            layers += [nn.BatchNorm2d(c_out), nn.ReLU()]
        else:
            layers.append(nn.ReLU())
        if pool:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    layers += [nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
               nn.Dropout(dropout), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def import_bnfast():
    """(module, None) or (None, reason) so a missing build skips, not crashes, the run."""
    try:
        import bnfast
        bnfast.convert  # noqa: B018 - the API this benchmark needs
        return bnfast, None
    except Exception as e:  # ImportError, or a broken extension build (OSError, ...)
        return None, f"{type(e).__name__}: {e}"


def make_models(variant: str, impls, seed: int, dropout: float = 0.5, bnfast_mod=None,
                fuse: bool = False, memory_efficient: bool = False) -> dict[str, nn.Module]:
    """{impl: model} with identical initial weights across impls; impl no_bn is
    the same model with its BN layers replaced by identities. The seed CNN's
    no_bn variant is its own control: {"no_bn": model}."""
    torch.manual_seed(seed)
    base = build_model(variant, dropout)
    if variant == "no_bn":
        return {NO_BN: base}
    models = {}
    for impl in impls:
        model = copy.deepcopy(base)
        if impl == "bnfast":
            model = bnfast_mod.convert(model, fuse=fuse, memory_efficient=memory_efficient)
        elif impl == NO_BN:
            model = strip_bn(model)
        elif impl != "torch":
            raise ValueError(f"unknown impl {impl!r}")
        models[impl] = model
    return models


def memory_format(precision: str) -> torch.memory_format:
    """bf16 runs channels_last (what tensor-core convolutions want); fp32 NCHW."""
    return torch.channels_last if precision == "bf16" else torch.contiguous_format


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def prepare(images: torch.Tensor, precision: str) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32 in [0, 1], in the precision's memory format."""
    return cifar10.to_float(images).contiguous(memory_format=memory_format(precision))


# ---------------------------------------------------------------------------
# Training

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA is asynchronous; CPU ops are not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def get_rng_state(device: torch.device):
    # Dropout on CUDA draws from the CUDA generator, so lockstep runs keep both.
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch: int = 1000, precision: str = "fp32") -> float:
    """Test accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        with autocast(images.device, precision):
            out = model(prepare(images[i:i + batch], precision))
        correct += (out.argmax(1) == labels[i:i + batch]).sum().item()
    model.train()
    return 100.0 * correct / len(images)


def train_together(models: dict[str, nn.Module], train_x: torch.Tensor, train_y: torch.Tensor, *,
                   epochs: int, seed: int, batch_size: int = BATCH_SIZE, lr: float | None = None,
                   precision: str = "fp32", test_x=None, test_y=None, desc: str = "",
                   progress: bool = True) -> dict:
    """Train several models in lockstep on the same batches; {name: record}.

    The models and data are on one device (train_x's). Each batch is prepared
    once (uint8 -> float, in the precision's memory format, outside the timed
    step), then every model takes its step on it, in alternating order.
    Interleaving means a burst of load from elsewhere on the machine hits all
    runs alike, so step time ratios stay meaningful on a shared CPU. Each
    model keeps its own RNG state, so its dropout masks and the data order
    depend only on seed: the result is the same as training that model alone.
    """
    from tqdm import tqdm

    device = train_x.device
    torch.manual_seed(seed)
    rng = {name: get_rng_state(device) for name in models}
    order = torch.Generator().manual_seed(seed)
    opts = {name: torch.optim.Adam(m.parameters(), **({} if lr is None else {"lr": lr}))
            for name, m in models.items()}
    loss_fn = nn.CrossEntropyLoss()
    n = len(train_x)
    steps_per_epoch = math.ceil(n / batch_size)
    recs = {name: {"step_loss": [], "step_time_s": [], "epochs": []} for name in models}
    for m in models.values():
        m.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress,
               dynamic_ncols=True, file=sys.stderr, unit="batch")
    names = list(models)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order).to(device)
        t_epoch = time.perf_counter()
        first = len(recs[names[0]]["step_loss"])
        for k, i in enumerate(range(0, n, batch_size)):
            idx = perm[i:i + batch_size]
            x = prepare(train_x[idx], precision)
            y = train_y[idx]
            for name in (names if k % 2 == 0 else names[::-1]):
                model, opt = models[name], opts[name]
                set_rng_state(rng[name], device)
                # The clock starts with nothing queued and stops when this
                # step's last kernel is done (a no-op on the CPU, where ops
                # are synchronous).
                synchronize(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with autocast(device, precision):
                    loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                synchronize(device)
                dt = time.perf_counter() - t0
                rng[name] = get_rng_state(device)
                recs[name]["step_time_s"].append(dt)
                recs[name]["step_loss"].append(loss.item())
            bar.update(1)
            if k % 10 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{recs[names[0]]['step_loss'][-1]:.3f}")
        wall = time.perf_counter() - t_epoch
        for name, rec in recs.items():
            losses = rec["step_loss"][first:]
            e = {"epoch": epoch + 1, "steps": len(losses),
                 # This run's own training time this epoch: its timed steps.
                 "train_s": math.fsum(rec["step_time_s"][first:]),
                 # All runs of the group plus batch preparation.
                 "group_wall_s": wall,
                 "mean_train_loss": statistics.fmean(losses), "test_acc": None, "eval_s": None}
            if test_x is not None:
                t0 = time.perf_counter()
                e["test_acc"] = evaluate(models[name], test_x, test_y, precision=precision)
                e["eval_s"] = time.perf_counter() - t0
            rec["epochs"].append(e)
    bar.close()
    for rec in recs.values():
        rec["median_step_ms"] = 1e3 * statistics.median(rec["step_time_s"])
        rec["final_test_acc"] = rec["epochs"][-1]["test_acc"]
    return recs


def train(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, **kwargs) -> dict:
    """Train one model; same keywords and record as train_together."""
    return train_together({"model": model}, train_x, train_y, **kwargs)["model"]


# ---------------------------------------------------------------------------
# Options

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_cifar",
        description="Train the seed CNN (and ResNets) on CIFAR-10 with torch BatchNorm2d, with bnfast "
                    "and without BN, in lockstep; report step times, accuracy over seeds, per-step loss "
                    "agreement, plots (PNG), JSON and a markdown summary.")
    p.add_argument("--data", default=None,
                   help="cifar-10-python.tar.gz, an extracted cifar-10-batches-py folder, or a subset "
                        "file (.pt/.npz, python -m benchmarks.cifar10 --export-subset). "
                        "Default: the cache folder (--cache-dir), then the project's shared copy "
                        f"{cifar10.SHARED_ARCHIVE}, then a download of the official archive "
                        "(MD5-checked). With no data at all, only step times on random batches "
                        "are reported (no accuracy).")
    p.add_argument("--cache-dir", default=None,
                   help=f"where downloads go / are looked for (default {cifar10.default_cache_dir()})")
    p.add_argument("--no-download", action="store_true", help="never try to download the data")
    p.add_argument("--synthetic", action="store_true",
                   help="skip the data set: time steps on random CIFAR-shaped batches, no accuracy")
    p.add_argument("--timing-only", action="store_true",
                   help="time --steps steps per run on random batches (no data set needed, no accuracy); "
                        "without --models/--precision/--batch-size: the reference rows "
                        + ", ".join(f"{m} {pr} b{b}" for m, pr, b in TIMING_ROWS))
    p.add_argument("--out", default="benchmarks/results/cifar10",
                   help="output folder (default %(default)s, git-ignored)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="default %(default)s")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help=f"from {', '.join(MODELS)} (default seed; resnet50 is timing only, "
                        f"on random {RESNET50_SIZE}x{RESNET50_SIZE} batches)")
    p.add_argument("--precision", nargs="+", default=None, metavar="P",
                   help="fp32 (NCHW) and/or bf16 (autocast to bfloat16, model and inputs channels_last); "
                        "default fp32")
    p.add_argument("--batch-size", nargs="+", type=int, default=None, metavar="N",
                   help="one or more; default per model: "
                        + ", ".join(f"{m} {b}" for m, b in DEFAULT_BATCH.items()))
    p.add_argument("--seeds", "--seed", nargs="+", type=int, default=[0], metavar="SEED",
                   help="init, data order and dropout seeds; each is one lockstep run per model "
                        "(default 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per run (default {DEFAULT_EPOCHS}; the full run is {FULL_EPOCHS})")
    p.add_argument("--subset", type=int, default=None,
                   help="train on the first N training images (default all)")
    p.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on the first N test images (default all)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="seed CNN variants, comma-separated, from %s (default all; a ResNet always "
                        "runs torch, bnfast and no_bn)" % ", ".join(VARIANTS))
    p.add_argument("--impls", default=",".join(IMPLS),
                   help="BN implementations for BN variants (default %(default)s)")
    p.add_argument("--fuse", action="store_true",
                   help="bnfast runs use bnfast.convert(model, fuse=True) (BN + activation fusion)")
    p.add_argument("--memory-efficient", action="store_true",
                   help="with --fuse: bnfast.convert(model, fuse=True, memory_efficient=True)")
    p.add_argument("--resnet50-size", type=int, default=RESNET50_SIZE,
                   help="ResNet-50 input size in pixels (default %(default)s; smaller for smoke tests)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['subset']} train / {QUICK['test_subset']} test images, "
                        f"1 epoch, {QUICK['steps']} steps without data (explicit flags still win)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default Adam's 1e-3)")
    p.add_argument("--steps", "--synthetic-steps", type=int, default=None,
                   help=f"steps per run on random batches (default {SYNTHETIC_STEPS})")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def _listed(value, kind=str) -> list | None:
    """An option given as a list, one value or a comma/space-separated string
    (library callers pass any) -> a list; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return [kind(v) for v in value]


def resolve_options(options=None, **overrides) -> argparse.Namespace:
    """Parser defaults <- options (Namespace or dict) <- overrides; applies --quick
    and resolves the cases (args.cases, a list of Case)."""
    parser = build_parser()
    args = merge_options(parser, options, overrides)
    # A misspelt key would otherwise be kept and silently ignored.
    unknown = sorted(set(vars(args)) - set(vars(parser.parse_args([]))))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; see python -m benchmarks.train_cifar -h")
    for k, v in QUICK.items():
        if getattr(args, k) is None and args.quick:
            setattr(args, k, v)
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    if args.steps is None:
        args.steps = SYNTHETIC_STEPS
    for name, kind in (("variants", str), ("impls", str), ("models", str), ("precision", str),
                       ("batch_size", int), ("seeds", int)):
        setattr(args, name, _listed(getattr(args, name), kind))
    bad = ([v for v in args.variants if v not in VARIANTS] + [i for i in args.impls if i not in IMPLS]
           + [m for m in args.models or () if m not in MODELS]
           + [p for p in args.precision or () if p not in PRECISIONS])
    if bad:
        raise ValueError(f"unknown variant/impl/model/precision {bad}; variants: {VARIANTS}, impls: {IMPLS}, "
                         f"models: {MODELS}, precisions: {PRECISIONS}")
    for wrong, message in ((args.epochs < 1, "--epochs must be >= 1"),
                           (args.steps < 1, "--steps must be >= 1"),
                           (not args.seeds, "--seeds needs at least one seed"),
                           (any(b < 1 for b in args.batch_size or ()), "--batch-size must be >= 1"),
                           # At 32 px ResNet-50's layer4 maps are 1x1 already: nothing smaller is its workload.
                           (args.resnet50_size < 32, "--resnet50-size must be >= 32"),
                           (args.fuse and "bnfast" not in args.impls,
                            "--fuse applies to the bnfast runs, and --impls has no bnfast"),
                           (args.memory_efficient and not args.fuse, "--memory-efficient needs --fuse")):
        if wrong:
            raise ValueError(message)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'none'}); run on a machine with a GPU and a "
                         "CUDA build of torch, or use --device cpu")
    if args.timing_only and args.models is None and args.precision is None and args.batch_size is None:
        rows = TIMING_ROWS
    else:
        rows = [(m, pr, b) for m in args.models or ["seed"] for pr in args.precision or ["fp32"]
                for b in args.batch_size or [DEFAULT_BATCH[m]]]
    args.cases = [Case(m, pr, b, args.resnet50_size if m == "resnet50" else 32) for m, pr, b in rows]
    return args


def machine_info(device: str = "cpu") -> dict:
    from benchmarks.kernels import machine_info as kernel_machine_info  # one description of the machine

    info = kernel_machine_info(device)
    if device == "cuda":
        # torch's defaults decide what "fp32" means on a GPU: cuDNN convolutions
        # use TF32 unless allow_tf32 is off.
        info["cuda_flags"] = {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                              "cudnn_benchmark": torch.backends.cudnn.benchmark,
                              "matmul_precision": torch.get_float32_matmul_precision()}
    return info


# ---------------------------------------------------------------------------
# Reports

def spread(values) -> dict | None:
    """n, mean, sample std (None for one value), min and max of values; None if empty."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def loss_agreement(pairs) -> dict:
    """|loss_torch - loss_bnfast| per step of lockstep (torch run, bnfast run)
    pairs: at the first step (same weights, same batch: the forward pass
    alone), the median and max over all steps, and at the last step (after
    the rounding differences of the whole run); first and last of the worst pair."""
    d = [[abs(a - b) for a, b in zip(t["step_loss"], f["step_loss"], strict=True)] for t, f in pairs]
    steps = [x for run in d for x in run]
    return {"first": max(run[0] for run in d), "median": statistics.median(steps), "max": max(steps),
            "last": max(run[-1] for run in d)}


def case_of(run: dict) -> Case:
    return Case(run["model"], run["precision"], run["batch_size"], run["image_size"])


def _median_ms(runs) -> float | None:
    # Over the steps of all seeds; for one seed this is the run's median_step_ms.
    return 1e3 * statistics.median(t for r in runs for t in r["step_time_s"]) if runs else None


def _ratio(a, b):
    return None if a is None or b is None else a / b


def summarize_row(per_seed: dict) -> dict:
    """One network at one case over seeds; per_seed: {seed: (torch run, bnfast run,
    no-BN run)}, any of them None."""
    t_runs, f_runs, c_runs = ([g[k] for g in per_seed.values() if g[k]] for k in range(3))
    t_ms, f_ms, c_ms = _median_ms(t_runs), _median_ms(f_runs), _median_ms(c_runs)
    row = {"seeds": list(per_seed), "torch_step_ms": t_ms, "bnfast_step_ms": f_ms, "no_bn_step_ms": c_ms,
           "speedup": _ratio(t_ms, f_ms), "speedup_paired": None,
           # The most any BN could give: a BN that cost nothing steps as fast as no BN.
           "no_bn_ceiling": _ratio(t_ms, c_ms),
           # BN's share: the fraction of the step that goes away without BN.
           "bn_share_torch": None if c_ms is None or t_ms is None else 1.0 - c_ms / t_ms,
           "bn_share_bnfast": None if c_ms is None or f_ms is None else 1.0 - c_ms / f_ms,
           "per_seed": [], "loss_agreement": None}
    diffs = []
    for seed, (t, f, c) in per_seed.items():
        acc = {k: r and r["final_test_acc"] for k, r in (("torch", t), ("bnfast", f), ("no_bn", c))}
        e = {"seed": seed, **{f"{k}_acc": v for k, v in acc.items()}, "acc_diff_points": None,
             "loss_agreement": None}
        if t and f:
            e["loss_agreement"] = loss_agreement([(t, f)])
            if acc["torch"] is not None and acc["bnfast"] is not None:
                e["acc_diff_points"] = acc["bnfast"] - acc["torch"]
        diffs.append(e["acc_diff_points"])
        row["per_seed"].append(e)
    row["acc"] = {k: spread(e[f"{k}_acc"] for e in row["per_seed"]) for k in ("torch", "bnfast", "no_bn")}
    row["acc"]["diff"] = spread(diffs)
    for k in ("torch", "bnfast", "no_bn"):
        row[f"{k}_acc"] = row["acc"][k] and row["acc"][k]["mean"]
    row["acc_diff_points"] = row["acc"]["diff"] and row["acc"]["diff"]["mean"]
    pairs = [(t, f) for t, f, _ in per_seed.values() if t and f]
    if pairs:
        # Steps k of both runs ran back to back on the same batch, so the
        # median per-step ratio cancels slow spells of the machine.
        row["speedup_paired"] = statistics.median(
            a / b for t, f in pairs for a, b in zip(t["step_time_s"], f["step_time_s"]))
        row["loss_agreement"] = loss_agreement(pairs)
    return row


def summarize(runs: list[dict], device: str = "cpu", fuse: bool = False) -> dict:
    """{"rows": one per network and case over seeds, "bar": the seed CNN's CPU
    bar, for the plain swap or, with fuse, for bnfast.convert(fuse=True)}."""
    groups: dict = {}  # (case, seed) -> {(variant, impl): run}
    for r in runs:
        groups.setdefault((case_of(r), r["seed"]), {})[(r["variant"], r["impl"])] = r
    per_row: dict = {}  # (case, variant) -> {seed: (torch, bnfast, no-BN control)}
    for (case, seed), g in groups.items():
        control = next((r for (_, impl), r in g.items() if impl == NO_BN), None)
        for variant in dict.fromkeys(v for v, impl in g if impl != NO_BN):
            per_row.setdefault((case, variant), {})[seed] = (g.get((variant, "torch")),
                                                             g.get((variant, "bnfast")), control)
    rows = [{**case._asdict(), "variant": variant,
             "data": next(r["data"] for g in per_seed.values() for r in g if r),
             **summarize_row(per_seed)} for (case, variant), per_seed in per_row.items()]
    seed = next((r for r in rows if r["variant"] == "seed" and (r["precision"], r["batch_size"])
                 == ("fp32", BATCH_SIZE)), {}) if device == "cpu" else {}
    # The accuracy bar is for the full run: a shorter run's final accuracy is
    # a mid-training value that moves by points from epoch to epoch.
    epochs = max((len(r["epochs"]) for r in runs), default=0)
    speedup_min = BAR_SPEEDUP_FUSED if fuse else BAR_SPEEDUP
    bar = {"issue": 11 if fuse else 3, "speedup_min": speedup_min, "acc_tol_points": BAR_ACC_POINTS,
           "acc_min_epochs": FULL_EPOCHS,
           "speedup_met": None if seed.get("speedup") is None else seed["speedup"] >= speedup_min,
           "accuracy_met": None if seed.get("acc_diff_points") is None or epochs < FULL_EPOCHS
           else abs(seed["acc_diff_points"]) <= BAR_ACC_POINTS}
    return {"rows": rows, "bar": bar}


def _fmt(v, spec=".2f", none="n/a"):
    return none if v is None else format(v, spec)


def _fmt_spread(s, spec=".2f", none="n/a"):
    """mean ± std [min, max] over seeds, or the one value."""
    if s is None:
        return none
    if s["n"] == 1:
        return format(s["mean"], spec)
    return f"{s['mean']:{spec}} ± {s['std']:.2f} [{s['min']:{spec}}, {s['max']:{spec}}]"


def _input(r: dict) -> str:
    return f"{r['batch_size']}x3x{r['image_size']}x{r['image_size']}"


def _x(v):
    return "n/a" if v is None else f"{v:.2f}x"


def _share(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _agreement_cells(a: dict | None) -> str:
    return " | ".join(_fmt(a and a[k], ".2e") for k in ("first", "median", "max", "last"))


def markdown(result: dict) -> str:
    o, m = result["options"], result["machine"]
    lines = ["# CIFAR-10 training benchmark: torch BatchNorm2d vs bnfast", ""]
    gpu = f"; device {o['device']}" + (f" ({m['gpu_name']})" if m.get("gpu_name") else "")
    lines.append(f"Machine: {m['cpu_model']}, {m['logical_cpus']} CPUs, {m['torch_threads']} torch "
                 f"threads, torch {m['torch_version']}{gpu}"
                 + (f"; CPU share during training {100 * result['cpu_share']:.0f}%."
                    if result.get("cpu_share") is not None else "."))
    d = result["data"]
    seeds = ", ".join(map(str, o["seeds"]))
    if d["synthetic"]:
        lines.append("")
        lines.append(f"**No CIFAR-10 data ({d['reason']}): timed {o['steps']} steps per run "
                     "on random CIFAR-shaped batches. No accuracy is reported: none was measured.**")
    else:
        lines.append(f"Data: {d['source']['path']} ({d['source']['kind']}), {d['n_train']} train / "
                     f"{d['n_test']} test images, {o['epochs']} epoch(s), seed(s) {seeds}.")
    if any(r["model"] in TIMING_ONLY_MODELS for r in result["runs"]):
        lines.append(f"\nResNet-50 rows are timing only: {o['steps']} steps on random "
                     f"{o['resnet50_size']}x{o['resnet50_size']} batches, no accuracy.")
    if o.get("fuse"):
        saving = ", memory_efficient=True" if o.get("memory_efficient") else ""
        lines.append(f"\nbnfast runs use bnfast.convert(model, fuse=True{saving}).")
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    rows = result["summary"]["rows"]
    lines += ["", "## Step time", "",
              "| variant | precision | input | torch step (ms) | bnfast step (ms) | no-BN step (ms) | speed-up "
              "| paired speed-up | no-BN ceiling | BN share of step, torch | BN share, bnfast |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['precision']} | {_input(r)} | {_fmt(r['torch_step_ms'])} | "
                     f"{_fmt(r['bnfast_step_ms'])} | {_fmt(r['no_bn_step_ms'])} | {_x(r['speedup'])} | "
                     f"{_x(r['speedup_paired'])} | {_x(r['no_bn_ceiling'])} | "
                     f"{_share(r['bn_share_torch'])} | {_share(r['bn_share_bnfast'])} |")
    # Random-data runs have no accuracy: their tables keep only the loss agreement.
    with_acc = any(r["data"] == "cifar10" for r in rows)
    acc_head = ("| torch acc (%) | bnfast acc (%) | no-BN acc (%) | acc diff (points, bnfast - torch) "
                if with_acc else "")
    agree_head = "| \\|loss diff\\| first step | median | max | last step |"
    lines += ["", "## Accuracy and per-step loss agreement" if with_acc else "## Per-step loss agreement", "",
              ("Test accuracy after the last epoch, mean ± sample std [min, max] over seeds; " if with_acc else "")
              + "|loss diff| = |loss_torch - loss_bnfast| of the lockstep runs on the same batches.", "",
              "| variant | precision | input | seeds " + acc_head + agree_head,
              "|---|---|---|---|" + "---:|" * (8 if with_acc else 4)]
    for r in rows:
        none = "not measured" if r["data"] == "random" else "n/a"
        a = r["acc"]
        acc = (f"{_fmt_spread(a['torch'], none=none)} | {_fmt_spread(a['bnfast'], none=none)} | "
               f"{_fmt_spread(a['no_bn'], none=none)} | {_fmt_spread(a['diff'], '+.2f', none=none)} | ")
        lines.append(f"| {r['variant']} | {r['precision']} | {_input(r)} | {', '.join(map(str, r['seeds']))} | "
                     + (acc if with_acc else "") + f"{_agreement_cells(r['loss_agreement'])} |")
    if len(o["seeds"]) > 1:
        lines += ["", "Per seed:", "", "| variant | precision | input | seed " + acc_head + agree_head,
                  "|---|---|---|---:|" + "---:|" * (8 if with_acc else 4)]
        for r in rows:
            for e in r["per_seed"]:
                acc = (f"{_fmt(e['torch_acc'])} | {_fmt(e['bnfast_acc'])} | {_fmt(e['no_bn_acc'])} | "
                       f"{_fmt(e['acc_diff_points'], '+.2f')} | ")
                lines.append(f"| {r['variant']} | {r['precision']} | {_input(r)} | {e['seed']} | "
                             + (acc if with_acc else "") + f"{_agreement_cells(e['loss_agreement'])} |")
    lines += ["", "## Runs", "",
              "| variant | BN | precision | input | seed | median step (ms) | s/epoch (its steps) "
              "| final-epoch train loss | final test acc (%) |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        ep = r["epochs"]
        lines.append(f"| {r['variant']} | {'none' if r['impl'] == NO_BN else r['impl']} | {r['precision']} | "
                     f"{_input(r)} | {r['seed']} | {_fmt(r['median_step_ms'])} | "
                     f"{_fmt(statistics.fmean(e['train_s'] for e in ep) if ep else None)} | "
                     f"{_fmt(ep[-1]['mean_train_loss'] if ep else None, '.4f')} | "
                     f"{_fmt(r['final_test_acc'], none='not measured')} |")
    b = result["summary"]["bar"]
    if o["device"] == "cpu":
        yes = {True: "met", False: "NOT met", None: "not measured"}
        epochs = max((len(r["epochs"]) for r in result["runs"]), default=0)
        acc = yes[b["accuracy_met"]]
        if b["accuracy_met"] is None and not d["synthetic"] and 0 < epochs < b["acc_min_epochs"]:
            acc = f"not judged ({epochs} epoch(s); the bar is for the full {b['acc_min_epochs']}-epoch run)"
        fused = ", bnfast.convert(model, fuse=True)" if o.get("fuse") else ""
        lines += ["", f"Bar (issue #{b['issue']}: seed CNN, fp32, batch {BATCH_SIZE}, CPU{fused}): "
                  f"step speed-up >= {b['speedup_min']}x: "
                  f"{yes[b['speedup_met']]}; final accuracy (mean over seeds) within {b['acc_tol_points']} "
                  f"point of torch: {acc}."]
    lines += ["", "Speed-up = torch median step / bnfast median step; paired = median over steps of "
              "the per-step ratio (all runs step in lockstep on the same batches). "
              "No-BN ceiling = torch step / no-BN step: the speed-up a BN that cost nothing would give. "
              "BN share = 1 - (no-BN step time / step time): the part of the step BN costs. "
              "Medians are over the steps of all seeds."]
    return "\n".join(lines) + "\n"


def run_label(r: dict, cases: int) -> str:
    """A run's name, with its case when the runs have more than one."""
    return r["name"] if cases == 1 else f"{r['name']} {r['precision']} {_input(r)}"


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    files = []
    # One seed's runs: the others repeat the picture and crowd the legend.
    runs = [r for r in result["runs"] if r["seed"] == result["options"]["seeds"][0]]
    n_cases = len({case_of(r) for r in runs})
    labels = [run_label(r, n_cases) for r in runs]
    acc_runs = [(r, label) for r, label in zip(runs, labels) if r["final_test_acc"] is not None]
    if acc_runs:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for r, label in acc_runs:
            losses = r["step_loss"]
            spe = r["epochs"][0]["steps"] or 1
            # Running mean over ~1/10 epoch so curves are readable.
            w = max(1, min(50, spe // 10))
            sm = torch.tensor(losses).unfold(0, w, 1).mean(1).tolist() if len(losses) >= w else losses
            a1.plot([(i + w) / spe for i in range(len(sm))], sm, label=label, lw=1)
            a2.plot([e["epoch"] for e in r["epochs"]], [e["test_acc"] for e in r["epochs"]],
                    marker="o", label=label)
        a1.set(xlabel="epoch", ylabel="train loss (running mean)", title="Training loss")
        a2.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"{PREFIX}curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(12, 0.6 * len(runs)), 4.5))
    n_ep = max(len(r["epochs"]) for r in runs)
    width = 0.8 / max(n_ep, 1)
    for k in range(n_ep):
        vals = [r["epochs"][k]["train_s"] if k < len(r["epochs"]) else 0 for r in runs]
        a1.bar([i + k * width for i in range(len(runs))], vals, width, label=f"epoch {k + 1}")
    a1.set_xticks([i + (n_ep - 1) * width / 2 for i in range(len(runs))], labels, rotation=20, ha="right")
    a1.set(ylabel="seconds", title="Training time per epoch (sum of step times)")
    a1.legend()
    a2.bar(range(len(runs)), [r["median_step_ms"] for r in runs], color="tab:orange")
    a2.set_xticks(range(len(runs)), labels, rotation=20, ha="right")
    a2.set(ylabel="ms", title="Median training step time")
    for a in (a1, a2):
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / f"{PREFIX}times.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))
    return files


# ---------------------------------------------------------------------------
# Entry points

def load_data(args) -> tuple[cifar10.Cifar10 | None, str | None]:
    """(data, None) or (None, reason) when there is no data set to use."""
    if args.synthetic or args.timing_only:
        return None, f"--{'timing-only' if args.timing_only else 'synthetic'} given"
    try:
        return cifar10.load_cifar10(args.data, cache_dir=args.cache_dir,
                                    download_missing=not args.no_download,
                                    progress=not args.no_progress), None
    except cifar10.CifarUnavailable as e:
        return None, str(e)


def load_bnfast(args, notes: list[str]):
    """(impls, bnfast module or None): bnfast leaves impls, with a note, when it
    cannot run on args.device. Raises ValueError for --fuse without bnfast."""
    impls = list(args.impls)
    bn_runs = any(c.model != "seed" for c in args.cases) or any(v != "no_bn" for v in args.variants)
    if "bnfast" not in impls or not bn_runs:
        return impls, None
    bnfast_mod, err = import_bnfast()
    if bnfast_mod is not None and args.device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "bnfast::forward", "CUDA"):
        bnfast_mod, err = None, "it was built without its CUDA kernels (build with a CUDA torch and nvcc)"
    if args.fuse and bnfast_mod is None:
        raise ValueError(f"--fuse needs bnfast, which cannot run here ({err})")
    if bnfast_mod is None:
        notes.append(f"bnfast could not be used ({err}); bnfast runs skipped")
        print(f"warning: {notes[-1]}", file=sys.stderr)
        impls.remove("bnfast")
    return impls, bnfast_mod


def random_batches(case: Case, steps: int, seed: int, device: torch.device):
    """steps batches of random uint8 images and labels, made on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = steps * case.batch_size
    x = torch.randint(0, 256, (n, 3, case.image_size, case.image_size), dtype=torch.uint8,
                      device=device, generator=g)
    return x, torch.randint(0, NUM_CLASSES[case.model], (n,), device=device, generator=g)


def lockstep_group(case: Case, seed: int, args, impls, bnfast_mod, device) -> tuple[dict, dict]:
    """The runs that step together for one case and seed: ({name: model}, {name: meta})."""
    models, meta = {}, {}
    variants = args.variants if case.model == "seed" else [case.model]
    # The seed CNN's control is its no_bn variant; a ResNet's is itself without BN.
    run_impls = impls if case.model == "seed" else impls + [NO_BN]
    for variant in variants:
        for impl, model in make_models(variant, run_impls, seed, bnfast_mod=bnfast_mod, fuse=args.fuse,
                                              memory_efficient=args.memory_efficient).items():
            name = variant if variant == "no_bn" else f"{variant}/{impl}"
            models[name] = model.to(device, memory_format=memory_format(case.precision))
            meta[name] = {"name": name, "model": case.model, "variant": variant, "impl": impl, "seed": seed,
                          **case._asdict()}
    return models, meta


def run(options=None, **overrides) -> dict:
    """Run the benchmark; write JSON, markdown and PNGs into options.out; return the results.

    Raises cifar10.CifarError when the data given is broken (a missing data
    set is not an error: the run falls back to timing random batches), and
    ValueError for options that cannot be honoured (--device cuda without a
    GPU, --fuse without bnfast support).
    """
    args = resolve_options(options, **overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    progress = not args.no_progress
    impls, bnfast_mod = load_bnfast(args, notes)

    data, reason = load_data(args)
    if data is None:
        msg = (f"no CIFAR-10 data ({reason}); timing {args.steps} steps per run on random "
               "batches, NO accuracy reported")
        print(f"warning: {msg}", file=sys.stderr)
        data_info = {"synthetic": True, "reason": reason}
    else:
        # On the device once; batches are gathered there.
        train_x, train_y = data.train_images[:args.subset].to(device), data.train_labels[:args.subset].to(device)
        test_x, test_y = data.test_images[:args.test_subset].to(device), data.test_labels[:args.test_subset].to(device)
        data_info = {"synthetic": False, "source": cifar10.describe_source(data.source),
                     "n_train": len(train_x), "n_test": len(test_x)}

    runs = []
    t0, c0 = time.perf_counter(), time.process_time()
    for case in args.cases:
        random_data = data is None or case.model in TIMING_ONLY_MODELS
        for seed in args.seeds:
            models, meta = lockstep_group(case, seed, args, impls, bnfast_mod, device)
            if random_data:
                batches = (*random_batches(case, args.steps, seed, device), None, None)
            else:
                batches = (train_x, train_y, test_x, test_y)
            desc = f"{case.model} {case.precision} b{case.batch_size} seed {seed}"
            recs = train_together(models, *batches[:2], epochs=1 if random_data else args.epochs, seed=seed,
                                  batch_size=case.batch_size, lr=args.lr, precision=case.precision,
                                  test_x=batches[2], test_y=batches[3], desc=desc, progress=progress)
            for name, rec in recs.items():
                rec.update(meta[name], data="random" if random_data else "cifar10")
                runs.append(rec)
                acc = rec["final_test_acc"]
                print(f"{desc:28s} {name:20s} median step {rec['median_step_ms']:8.2f} ms, "
                      f"{statistics.fmean(e['train_s'] for e in rec['epochs']):7.2f} s/epoch (steps), "
                      f"final test acc {'not measured' if acc is None else f'{acc:.2f}%'}",
                      file=sys.stderr)
    total = time.perf_counter() - t0
    print(f"training + evaluation of all runs: {total:.1f} s", file=sys.stderr)
    cpu_share = None
    if device.type == "cpu" and runs:
        # CPU time we got / CPU time our threads could use: well below 1 means
        # other work competed for the cores and the timings are suspect.
        usable = min(torch.get_num_threads(), os.cpu_count() or 1)
        cpu_share = (time.process_time() - c0) / (total * usable)
        if cpu_share < CPU_SHARE_WARN:
            notes.append(f"this process got only {100 * cpu_share:.0f}% of the CPU time its "
                         f"{usable} threads could use: other work competed for the cores, so the "
                         "step times (and speed-ups) are unreliable; rerun on an idle machine")
            print(f"warning: {notes[-1]}", file=sys.stderr)

    options_json = dict(vars(args), cases=[c._asdict() for c in args.cases],
                        epochs_run=1 if data is None else args.epochs)
    result = {"benchmark": "cifar10_train", "machine": machine_info(args.device),
              "bnfast_version": getattr(bnfast_mod, "__version__", None),
              "options": options_json, "data": data_info,
              "notes": notes, "runs": runs, "summary": summarize(runs, args.device, args.fuse)}
    result["total_train_eval_s"] = total
    result["cpu_share"] = cpu_share
    files = {"json": str(out / f"{PREFIX}results.json"), "markdown": str(out / f"{PREFIX}summary.md")}
    result["files"] = files
    files["plots"] = plot(result, out) if runs else []
    write_report(result, files["json"], files["markdown"], markdown(result))
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (cifar10.CifarError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(result["files"]["markdown"]).read_text())
    print(f"results: {result['files']['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
