"""CIFAR-10 training benchmark: torch.nn.BatchNorm2d vs bnfast in a small CNN.

For each BN variant the same model (same seed, same initial weights, same data
order, same dropout masks) is trained once with torch's BatchNorm2d and once
after ``bnfast.convert``; ``no_bn`` (the same net without BN) is trained once as
a control. All runs step in lockstep on the same batches, so load from
elsewhere on a shared machine hits them alike. Step times cover only
zero_grad/forward/loss/backward/optimizer step, not batch preparation or
evaluation.

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
from pathlib import Path

import torch
from torch import nn

from benchmarks import cifar10, merge_options, write_report

VARIANTS = ("seed", "conv_bn_relu", "no_bn")
IMPLS = ("torch", "bnfast")
# This benchmark's own default is the full 10-epoch run. The suite
# (python -m benchmarks) trains SUITE_EPOCHS instead, so that it takes ~10-15
# min with the kernel benchmark on a 2-core CPU: on an idle 2-core AMD EPYC the
# five runs take ~68 s per epoch (steps of 24-32 ms, ~2 s per 10k-image eval),
# so 5 epochs is ~6 min. NB: one run's test accuracy moves by a few points
# from epoch to epoch, so a 5-epoch single-seed difference does not resolve 1
# point; the 10-epoch runs over several seeds do.
FULL_EPOCHS = 10
DEFAULT_EPOCHS = FULL_EPOCHS
SUITE_EPOCHS = 5
BATCH_SIZE = 128
# Acceptance bar for the seed CNN on CPU.
BAR_SPEEDUP = 1.35
BAR_ACC_POINTS = 1.0
QUICK = {"subset": 2048, "test_subset": 2000, "epochs": 1, "synthetic_steps": 20}
SYNTHETIC_STEPS = 100
PREFIX = "cifar10_"
CPU_SHARE_WARN = 0.7


# ---------------------------------------------------------------------------
# Model

def build_model(variant: str = "seed", dropout: float = 0.5) -> nn.Sequential:
    """The seed CNN. BN inputs at batch 128: 32x30x30, 64x13x13, 64x4x4."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
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


def make_models(variant: str, impls, seed: int, dropout: float = 0.5, bnfast_mod=None):
    """{impl: model} with identical initial weights across impls."""
    torch.manual_seed(seed)
    base = build_model(variant, dropout)
    if variant == "no_bn":
        return {"torch": base}
    models = {}
    for impl in impls:
        if impl == "torch":
            models["torch"] = copy.deepcopy(base)
        elif impl == "bnfast":
            models["bnfast"] = bnfast_mod.convert(copy.deepcopy(base))
        else:
            raise ValueError(f"unknown impl {impl!r}")
    return models


# ---------------------------------------------------------------------------
# Training

@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch: int = 1000) -> float:
    """Test accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        out = model(cifar10.to_float(images[i:i + batch]))
        correct += (out.argmax(1) == labels[i:i + batch]).sum().item()
    model.train()
    return 100.0 * correct / len(images)


def train_together(models: dict[str, nn.Module], train_x: torch.Tensor, train_y: torch.Tensor, *,
                   epochs: int, seed: int, batch_size: int = BATCH_SIZE, lr: float | None = None,
                   test_x=None, test_y=None, desc: str = "", progress: bool = True) -> dict:
    """Train several models in lockstep on the same batches; {name: record}.

    Each batch is prepared once (uint8 -> float, outside the timed step), then
    every model takes its step on it, in alternating order. Interleaving means
    a burst of load from elsewhere on the machine hits all runs alike, so step
    time ratios stay meaningful on a shared CPU. Each model keeps its own RNG
    state, so its dropout masks and the data order depend only on seed: the
    result is the same as training that model alone.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = {name: torch.get_rng_state() for name in models}
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
        perm = torch.randperm(n, generator=order)
        t_epoch = time.perf_counter()
        first = len(recs[names[0]]["step_loss"])
        for k, i in enumerate(range(0, n, batch_size)):
            idx = perm[i:i + batch_size]
            x = cifar10.to_float(train_x[idx])
            y = train_y[idx]
            for name in (names if k % 2 == 0 else names[::-1]):
                model, opt = models[name], opts[name]
                torch.set_rng_state(rng[name])
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                # CPU ops are synchronous, so the clock has seen all the work here.
                dt = time.perf_counter() - t0
                rng[name] = torch.get_rng_state()
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
                e["test_acc"] = evaluate(models[name], test_x, test_y)
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
        description="Train the seed CNN on CIFAR-10 with torch BatchNorm2d and with bnfast; "
                    "report step times, accuracy, plots (PNG), JSON and a markdown summary.")
    p.add_argument("--data", default=None,
                   help="cifar-10-python.tar.gz or an extracted cifar-10-batches-py folder. "
                        "Default: the cache folder (--cache-dir), then the project's shared copy "
                        f"{cifar10.SHARED_ARCHIVE}, then a download of the official archive "
                        "(MD5-checked). With no data at all, only step times on random batches "
                        "are reported (no accuracy).")
    p.add_argument("--cache-dir", default=None,
                   help=f"where downloads go / are looked for (default {cifar10.default_cache_dir()})")
    p.add_argument("--no-download", action="store_true", help="never try to download the data")
    p.add_argument("--synthetic", action="store_true",
                   help="skip the data set: time steps on random CIFAR-shaped batches, no accuracy")
    p.add_argument("--out", default="benchmarks/results/cifar10",
                   help="output folder (default %(default)s, git-ignored)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per run (default {DEFAULT_EPOCHS}; the full run is {FULL_EPOCHS})")
    p.add_argument("--subset", type=int, default=None,
                   help="train on the first N training images (default all 50,000)")
    p.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on the first N test images (default all 10,000)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, from %s (default all)" % ", ".join(VARIANTS))
    p.add_argument("--impls", default=",".join(IMPLS),
                   help="BN implementations for BN variants (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['subset']} train / {QUICK['test_subset']} test images, "
                        "1 epoch (explicit flags still win)")
    p.add_argument("--seed", type=int, default=0, help="init, data order and dropout seed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="default %(default)s")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default Adam's 1e-3)")
    p.add_argument("--synthetic-steps", type=int, default=None,
                   help=f"steps per run without data (default {SYNTHETIC_STEPS})")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def resolve_options(options=None, **overrides) -> argparse.Namespace:
    """Parser defaults <- options (Namespace or dict) <- overrides; applies --quick."""
    args = merge_options(build_parser(), options, overrides)
    for k, v in QUICK.items():
        if getattr(args, k) is None and args.quick:
            setattr(args, k, v)
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    if args.synthetic_steps is None:
        args.synthetic_steps = SYNTHETIC_STEPS
    for name in ("variants", "impls"):
        val = getattr(args, name)
        setattr(args, name, [s.strip() for s in val.split(",") if s.strip()]
                if isinstance(val, str) else list(val))
    bad = [v for v in args.variants if v not in VARIANTS] + [i for i in args.impls if i not in IMPLS]
    if bad:
        raise ValueError(f"unknown variant/impl {bad}; variants: {VARIANTS}, impls: {IMPLS}")
    if args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    return args


def machine_info() -> dict:
    from benchmarks.kernels import machine_info as kernel_machine_info  # one description of the machine

    return kernel_machine_info("cpu")


# ---------------------------------------------------------------------------
# Reports

def summarize(runs: list[dict]) -> dict:
    by = {(r["variant"], r["impl"]): r for r in runs}
    no_bn = by.get(("no_bn", "torch"))
    out = {}
    for variant in VARIANTS:
        if variant == "no_bn":
            continue
        t, f = by.get((variant, "torch")), by.get((variant, "bnfast"))
        if t is None and f is None:
            continue
        s = {"torch_step_ms": t and t["median_step_ms"], "bnfast_step_ms": f and f["median_step_ms"],
             "speedup": None, "speedup_paired": None, "torch_acc": t and t["final_test_acc"],
             "bnfast_acc": f and f["final_test_acc"], "acc_diff_points": None,
             "no_bn_step_ms": no_bn and no_bn["median_step_ms"],
             "bn_share_torch": None, "bn_share_bnfast": None}
        if t and f:
            s["speedup"] = t["median_step_ms"] / f["median_step_ms"]
            # Steps k of both runs ran back to back on the same batch, so the
            # median per-step ratio cancels slow spells of the machine.
            s["speedup_paired"] = statistics.median(
                a / b for a, b in zip(t["step_time_s"], f["step_time_s"]))
            if t["final_test_acc"] is not None and f["final_test_acc"] is not None:
                s["acc_diff_points"] = f["final_test_acc"] - t["final_test_acc"]
        # BN's share: the fraction of the step that goes away without BN.
        for impl, r in (("torch", t), ("bnfast", f)):
            if r and no_bn:
                s[f"bn_share_{impl}"] = 1.0 - no_bn["median_step_ms"] / r["median_step_ms"]
        out[variant] = s
    seed = out.get("seed", {})
    # The accuracy bar is for the full run: a shorter run's final accuracy is
    # a mid-training value that moves by points from epoch to epoch.
    epochs = max((len(r["epochs"]) for r in runs), default=0)
    bar = {"speedup_min": BAR_SPEEDUP, "acc_tol_points": BAR_ACC_POINTS, "acc_min_epochs": FULL_EPOCHS,
           "speedup_met": None if seed.get("speedup") is None else seed["speedup"] >= BAR_SPEEDUP,
           "accuracy_met": None if seed.get("acc_diff_points") is None or epochs < FULL_EPOCHS
           else abs(seed["acc_diff_points"]) <= BAR_ACC_POINTS}
    return {"variants": out, "bar": bar}


def _fmt(v, spec=".2f", none="n/a"):
    return none if v is None else format(v, spec)


def markdown(result: dict) -> str:
    o, m = result["options"], result["machine"]
    lines = ["# CIFAR-10 training benchmark: torch BatchNorm2d vs bnfast", ""]
    lines.append(f"Machine: {m['cpu_model']}, {m['logical_cpus']} CPUs, {m['torch_threads']} torch "
                 f"threads, torch {m['torch_version']}"
                 + (f"; CPU share during training {100 * result['cpu_share']:.0f}%."
                    if result.get("cpu_share") is not None else "."))
    d = result["data"]
    if d["synthetic"]:
        lines.append("")
        lines.append(f"**No CIFAR-10 data ({d['reason']}): timed {o['synthetic_steps']} steps per run "
                     "on random CIFAR-shaped batches. No accuracy is reported: none was measured.**")
    else:
        lines.append(f"Data: {d['source']['path']} ({d['source']['kind']}), {d['n_train']} train / "
                     f"{d['n_test']} test images, {o['epochs']} epoch(s), batch {o['batch_size']}, "
                     f"seed {o['seed']}.")
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    lines += ["", "## Runs", "",
              "| variant | BN | median step (ms) | s/epoch (its steps) | final-epoch train loss | final test acc (%) |",
              "|---|---|---:|---:|---:|---:|"]
    for r in result["runs"]:
        ep = r["epochs"]
        lines.append(f"| {r['variant']} | {r['impl'] if r['variant'] != 'no_bn' else '-'} | "
                     f"{_fmt(r['median_step_ms'])} | "
                     f"{_fmt(statistics.fmean(e['train_s'] for e in ep) if ep else None)} | "
                     f"{_fmt(ep[-1]['mean_train_loss'] if ep else None, '.4f')} | "
                     f"{_fmt(r['final_test_acc'], none='not measured')} |")
    lines += ["", "## bnfast vs torch", "",
              "| variant | torch step (ms) | bnfast step (ms) | speed-up | paired speed-up | acc diff (points, bnfast - torch) "
              "| BN share of step, torch | BN share, bnfast |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v, s in result["summary"]["variants"].items():
        share = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        lines.append(f"| {v} | {_fmt(s['torch_step_ms'])} | {_fmt(s['bnfast_step_ms'])} | "
                     f"{_fmt(s['speedup'], '.2f')}{'x' if s['speedup'] else ''} | "
                     f"{_fmt(s['speedup_paired'], '.2f')}{'x' if s['speedup_paired'] else ''} | "
                     f"{_fmt(s['acc_diff_points'], '+.2f', none='not measured' if d['synthetic'] else 'n/a')} | "
                     f"{share(s['bn_share_torch'])} | {share(s['bn_share_bnfast'])} |")
    b = result["summary"]["bar"]
    yes = {True: "met", False: "NOT met", None: "not measured"}
    epochs = max((len(r["epochs"]) for r in result["runs"]), default=0)
    acc = yes[b["accuracy_met"]]
    if b["accuracy_met"] is None and not d["synthetic"] and 0 < epochs < b["acc_min_epochs"]:
        acc = f"not judged ({epochs} epoch(s); the bar is for the full {b['acc_min_epochs']}-epoch run)"
    lines += ["", f"Bar (seed CNN): step speed-up >= {b['speedup_min']}x: {yes[b['speedup_met']]}; "
              f"final accuracy within {b['acc_tol_points']} point of torch: {acc}.",
              "", "Speed-up = torch median step / bnfast median step; paired = median over steps of "
              "the per-step ratio (all runs step in lockstep on the same batches). "
              "BN share = 1 - (no_bn step time / step time): the part of the step BN costs."]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    files = []
    runs = result["runs"]
    if not result["data"]["synthetic"]:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in runs:
            losses = r["step_loss"]
            spe = r["epochs"][0]["steps"] or 1
            # Running mean over ~1/10 epoch so curves are readable.
            w = max(1, min(50, spe // 10))
            sm = torch.tensor(losses).unfold(0, w, 1).mean(1).tolist() if len(losses) >= w else losses
            a1.plot([(i + w) / spe for i in range(len(sm))], sm, label=r["name"], lw=1)
            a2.plot([e["epoch"] for e in r["epochs"]], [e["test_acc"] for e in r["epochs"]],
                    marker="o", label=r["name"])
        a1.set(xlabel="epoch", ylabel="train loss (running mean)", title="Training loss")
        a2.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend()
        fig.tight_layout()
        path = out / f"{PREFIX}curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in runs]
    n_ep = max(len(r["epochs"]) for r in runs)
    width = 0.8 / max(n_ep, 1)
    for k in range(n_ep):
        vals = [r["epochs"][k]["train_s"] if k < len(r["epochs"]) else 0 for r in runs]
        a1.bar([i + k * width for i in range(len(runs))], vals, width, label=f"epoch {k + 1}")
    a1.set_xticks([i + (n_ep - 1) * width / 2 for i in range(len(runs))], names, rotation=20)
    a1.set(ylabel="seconds", title="Training time per epoch (sum of step times)")
    a1.legend()
    a2.bar(names, [r["median_step_ms"] for r in runs], color="tab:orange")
    a2.set_xticks(range(len(runs)), names, rotation=20)
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
    if args.synthetic:
        return None, "--synthetic given"
    try:
        return cifar10.load_cifar10(args.data, cache_dir=args.cache_dir,
                                    download_missing=not args.no_download,
                                    progress=not args.no_progress), None
    except cifar10.CifarUnavailable as e:
        return None, str(e)


def run(options=None, **overrides) -> dict:
    """Run the benchmark; write JSON, markdown and PNGs into options.out; return the results.

    Raises cifar10.CifarError when the data given is broken (a missing data
    set is not an error: the run falls back to timing random batches).
    """
    args = resolve_options(options, **overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    progress = not args.no_progress

    data, reason = load_data(args)
    if data is None:
        msg = (f"no CIFAR-10 data ({reason}); timing {args.synthetic_steps} steps per run on random "
               "batches, NO accuracy reported")
        print(f"warning: {msg}", file=sys.stderr)
        g = torch.Generator().manual_seed(args.seed)
        n = args.synthetic_steps * args.batch_size
        train_x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        train_y = torch.randint(0, 10, (n,), generator=g)
        test_x = test_y = None
        epochs = 1
        data_info = {"synthetic": True, "reason": reason, "n_train": n, "n_test": 0}
    else:
        train_x, train_y = data.train_images, data.train_labels
        test_x, test_y = data.test_images, data.test_labels
        if args.subset:
            train_x, train_y = train_x[:args.subset], train_y[:args.subset]
        if args.test_subset:
            test_x, test_y = test_x[:args.test_subset], test_y[:args.test_subset]
        epochs = args.epochs
        data_info = {"synthetic": False, "source": cifar10.describe_source(data.source),
                     "n_train": len(train_x), "n_test": len(test_x)}

    impls = list(args.impls)
    bnfast_mod = None
    if "bnfast" in impls and any(v != "no_bn" for v in args.variants):
        bnfast_mod, err = import_bnfast()
        if bnfast_mod is None:
            notes.append(f"bnfast could not be imported ({err}); bnfast runs skipped")
            print(f"warning: {notes[-1]}", file=sys.stderr)
            impls.remove("bnfast")

    # All runs train in lockstep on the same batches (see train_together).
    models, meta = {}, {}
    for variant in args.variants:
        for impl, model in make_models(variant, impls, args.seed, bnfast_mod=bnfast_mod).items():
            name = variant if variant == "no_bn" else f"{variant}/{impl}"
            models[name], meta[name] = model, {"variant": variant, "impl": impl, "name": name}
    runs = []
    cpu_share = None
    if models:
        t0, c0 = time.perf_counter(), time.process_time()
        recs = train_together(models, train_x, train_y, epochs=epochs, seed=args.seed,
                              batch_size=args.batch_size, lr=args.lr, test_x=test_x,
                              test_y=test_y, desc="cifar10 " + ",".join(models), progress=progress)
        total = time.perf_counter() - t0
        # CPU time we got / CPU time our threads could use: well below 1 means
        # other work competed for the cores and the timings are suspect.
        usable = min(torch.get_num_threads(), os.cpu_count() or 1)
        cpu_share = (time.process_time() - c0) / (total * usable)
        if cpu_share < CPU_SHARE_WARN:
            notes.append(f"this process got only {100 * cpu_share:.0f}% of the CPU time its "
                         f"{usable} threads could use: other work competed for the cores, so the "
                         "step times (and speed-ups) are unreliable; rerun on an idle machine")
            print(f"warning: {notes[-1]}", file=sys.stderr)
        for name, rec in recs.items():
            rec.update(meta[name])
            runs.append(rec)
            acc = rec["final_test_acc"]
            print(f"{name:20s} median step {rec['median_step_ms']:7.2f} ms, "
                  f"{statistics.fmean(e['train_s'] for e in rec['epochs']):6.2f} s/epoch (steps), "
                  f"final test acc {'not measured' if acc is None else f'{acc:.2f}%'}",
                  file=sys.stderr)
        print(f"training + evaluation of all runs: {total:.1f} s", file=sys.stderr)
    else:
        total = 0.0

    result = {"benchmark": "cifar10_train", "machine": machine_info(),
              "bnfast_version": getattr(bnfast_mod, "__version__", None),
              "options": {k: v for k, v in vars(args).items()}, "data": data_info,
              "notes": notes, "runs": runs, "summary": summarize(runs)}
    result["options"]["epochs_run"] = epochs
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
