"""The whole bnfast benchmark suite: ``python -m benchmarks``.

Runs, into one output folder:

1. the kernel benchmark (benchmarks/kernels.py) on the CPU, and on CUDA when
   torch sees a GPU: bnfast.BatchNorm*d vs torch.nn.BatchNorm*d per phase;
   then batch norm fused with relu (BN -> relu, BN + add -> relu,
   relu -> BN) against torch's unfused modules, eval forward and training
   forward+backward (on the CPU: the seed CNN's and two ResNet-18 shapes,
   float32 NCHW);
2. the CIFAR-10 training benchmark (benchmarks/train_cifar.py): the seed CNN
   trained with torch's BatchNorm2d and with bnfast; on CUDA (when torch sees
   a GPU) also the step times of the reference rows on random data (seed
   CNN, ResNet-18, ResNet-50; fp32 and bf16) and a short accuracy run of the
   seed CNN and ResNet-18 in fp32 and bf16 over three seeds;
3. the peak memory of one training step (benchmarks/memory.py) with torch's
   BN, bnfast fused and bnfast fused with memory_efficient=True: the seed CNN
   on the CPU (with bnfast's output cache on and off; on only with --quick),
   a ResNet-50 with leaky_relu on CUDA;

then prints a final summary (kernel speed-up table + training summary), also
written to ``<out>/summary.md``; ``<out>/suite.json`` indexes every part.

Sizes: the default run takes ~12-16 minutes on a 2-core CPU (kernels: the
default case list, ~3 min; training: train_cifar.SUITE_EPOCHS = 5 epochs);
``--quick`` is a 1-2 minute smoke run (CI); ``--full`` runs every kernel case
and the full training run (10 epochs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import torch

from benchmarks import kernels, write_report

PARTS = ("kernels", "train", "memory")
# Seeds of the GPU accuracy run: a GPU trains three as fast as a CPU trains a
# fraction of one, and one seed cannot tell a 1-point difference from noise.
CUDA_TRAIN_SEEDS = (0, 1, 2)
RESULTS = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="bnfast benchmark suite: kernel benchmark (CPU, plus CUDA when available) "
                    "then the CIFAR-10 training benchmark; one output folder, one summary.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1-2 minute smoke run (CI)")
    size.add_argument("--full", action="store_true",
                      help="every kernel case and the full training run (10 epochs unless --epochs)")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/run-<timestamp>)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated, from %s (default all)" % ", ".join(PARTS))
    p.add_argument("--devices", default="auto",
                   help="devices of the kernel and training benchmarks, comma-separated from cpu, cuda; "
                        "auto (default): cpu, plus cuda when torch.cuda.is_available()")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every part (default: torch's own choice)")
    k = p.add_argument_group("kernel benchmark (see python -m benchmarks.kernels -h)")
    k.add_argument("--cases", nargs="+", default=None, help="case names or groups")
    k.add_argument("--dtypes", nargs="+", default=None, help="float32, bfloat16")
    k.add_argument("--formats", nargs="+", default=None, help="nchw, channels_last")
    t = p.add_argument_group("training benchmark (see python -m benchmarks.train_cifar -h)")
    t.add_argument("--data", default=None,
                   help="CIFAR-10 archive or extracted folder, passed to the training benchmark "
                        "(default: its own search: cache folder, the shared copy, a download)")
    t.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default 5; --quick: 1; --full: 10)")
    t.add_argument("--subset", type=int, default=None, help="train on the first N images")
    t.add_argument("--variants", default=None, help="training variants (default all)")
    t.add_argument("--synthetic", action="store_true", help="train on random batches (no accuracy)")
    t.add_argument("--no-download", action="store_true", help="never download CIFAR-10")
    p.add_argument("--no-progress", action="store_true", help="no progress bars / lines")
    return p


def _devices(spec: str) -> list[str]:
    if spec == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devs = [d.strip() for d in spec.split(",") if d.strip()]
    bad = [d for d in devs if d not in ("cpu", "cuda")]
    if bad:
        raise ValueError(f"unknown device(s) {bad}; choose from cpu, cuda")
    return devs


def _relative(path: str, out: Path) -> str:
    """A part's file as summary.md refers to it: relative to the suite folder,
    so the summary stays right when the folder is moved or published."""
    return os.path.relpath(path, out)


def _demote(md: str) -> str:
    """Shift markdown headings one level down, to nest a part's report."""
    return "\n".join("#" + line if line.startswith("#") else line for line in md.splitlines())


# The fused configurations: what the fusing convert produces in the seed CNN
# (relu -> BN) and in ResNets (BN -> relu, BN + add -> relu).
FUSIONS = ("relu", "add_relu", "pre_relu")
FUSED_PHASES = ("fwd_eval", "fwd_bwd")
FUSED_CPU_CASES = {"quick": ("seed_bn3",), "default": ("seed_bn1", "seed_bn2", "seed_bn3", "r18_s1", "r18_s3")}


def run_kernels(args, device: str, out: Path, fused: bool = False) -> dict:
    opts = {"device": device, "quick": args.quick, "full": args.full, "out": str(out),
            "cases": args.cases, "dtypes": args.dtypes, "formats": args.formats,
            "threads": args.threads, "quiet": args.no_progress}
    if fused:
        opts.update(fusions=list(FUSIONS), phases=list(FUSED_PHASES))
        if device == "cpu":  # a 2-core CPU's budget: the shapes that matter, in float32 NCHW
            opts["cases"] = args.cases or list(FUSED_CPU_CASES["quick" if args.quick else "default"])
            opts["dtypes"] = args.dtypes or ["float32"]
            opts["formats"] = args.formats or ["nchw"]
    return kernels.run(opts)


def train_epochs(args):
    """Epochs for the training part: --epochs, else 10 with --full, 5 by
    default, and None with --quick (train_cifar's quick settings)."""
    from benchmarks import train_cifar

    if args.epochs is not None or args.quick:
        return args.epochs
    return train_cifar.FULL_EPOCHS if args.full else train_cifar.SUITE_EPOCHS


def train_options(args, out: Path) -> dict:
    """The CPU training run's train_cifar options."""
    opts = {"out": str(out), "data": args.data, "epochs": train_epochs(args), "quick": args.quick,
            "threads": args.threads, "no_progress": args.no_progress, "synthetic": args.synthetic,
            "no_download": args.no_download, "subset": args.subset}
    if args.variants:
        opts["variants"] = args.variants
    return opts


def train_runs(args, devices: list[str], out: Path) -> dict[str, tuple[str, dict]]:
    """{part name: (section title, train_cifar options)} of the training part on devices."""
    runs = {}
    if "cpu" in devices:
        runs["train"] = ("CIFAR-10 training", train_options(args, out / "cifar10"))
    if "cuda" in devices:
        runs["train-cuda-timing"] = ("Training step times, cuda (random data)",
                                     {"device": "cuda", "timing_only": True, "out": str(out / "cifar10-cuda-timing"),
                                      "quick": args.quick, "threads": args.threads, "no_progress": args.no_progress})
        runs["train-cuda"] = ("CIFAR-10 training, cuda",
                              dict(train_options(args, out / "cifar10-cuda"), device="cuda", models=["seed", "resnet18"],
                                   precision=["fp32", "bf16"], seeds=list(CUDA_TRAIN_SEEDS)))
    return runs


def train_summary(result: dict) -> str:
    """The training part's own markdown report, nested under the suite's headings."""
    from benchmarks import train_cifar

    md = train_cifar.markdown(result)
    # Drop its title line; the suite gives the section its own heading.
    lines = md.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return _demote("\n".join(lines)).strip()


def record_failure(suite: dict, sections: list[str], name: str, title: str, e: Exception) -> None:
    """A part that raised e (call it while handling e): its error goes into
    suite.json and the summary, and the other parts still run."""
    suite["errors"].append(f"{name}: {type(e).__name__}: {e}")
    suite["parts"][name] = {"ok": False, "error": traceback.format_exc()}
    print(f"error: {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
    sections.append(f"## {title}\n\nFAILED: {type(e).__name__}: {e}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    try:
        bad = [p for p in parts if p not in PARTS]
        if bad:
            raise ValueError(f"unknown part(s) {bad}; choose from {PARTS}")
        devices = _devices(args.devices)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS / f"run-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    size = "quick" if args.quick else "full" if args.full else "default"
    print(f"bnfast benchmark suite ({size}): parts {', '.join(parts)}; output in {out}", file=sys.stderr)

    suite = {"benchmark": "bnfast_suite", "size": size, "argv": sys.argv[1:] if argv is None else list(argv),
             "started": datetime.now().isoformat(timespec="seconds"),
             "machine": kernels.machine_info("cuda" if "cuda" in devices else "cpu"),
             "parts": {}, "errors": []}
    sections = []
    t_suite = time.perf_counter()

    kernel_runs = [(device, fused) for device in devices for fused in (False, True)] if "kernels" in parts else []
    for device, fused in kernel_runs:
        name = f"kernels-{device}" + ("-fused" if fused else "")
        title = f"Kernels, {device}" + (", fused with relu" if fused else "")
        print(f"\n== kernel benchmark, {device}{' (fused)' if fused else ''} ==", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            res = run_kernels(args, device, out / name, fused)
        except Exception as e:
            record_failure(suite, sections, name, title, e)
            continue
        suite["parts"][name] = {"ok": not res["errors"], "elapsed_s": time.perf_counter() - t0,
                                "files": res["files"], "summary": res["summary"],
                                "errors": res["errors"]}
        suite["errors"] += [f"{name}: {e}" for e in res["errors"]]
        m = res["machine"]
        dev = m["gpu_name"] if device == "cuda" else f"{m['cpu_model']}, {m['torch_threads']} threads, ISA {m['bnfast_cpu_isa']}"
        sections.append(f"## {title} ({dev})\n\nSpeed-up = torch time / bnfast time "
                        f"(median; > 1: bnfast faster). Details: {_relative(res['files']['markdown'], out)}\n\n"
                        + (f"**{kernels.busy_note(res)}**\n\n" if kernels.busy_note(res) else "")
                        + kernels.speedup_table(res))

    if "train" in parts:
        from benchmarks import train_cifar

        for name, (title, opts) in train_runs(args, devices, out).items():
            print(f"\n== {title} ==", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                res = train_cifar.run(opts)
            except Exception as e:
                record_failure(suite, sections, name, title, e)
                continue
            suite["parts"][name] = {"ok": True, "elapsed_s": time.perf_counter() - t0,
                                    "files": res["files"], "summary": res["summary"],
                                    "synthetic": res["data"]["synthetic"], "notes": res["notes"]}
            sections.append(f"## {title}\n\nDetails: " + _relative(res["files"]["markdown"], out) + "\n\n"
                            + train_summary(res))

    for device in devices if "memory" in parts else []:
        from benchmarks import memory

        name, title = f"memory-{device}", f"Peak memory of a training step, {device}"
        model = ["--model", "resnet50", "--act", "leaky_relu", "--batch-size", "64"] if device == "cuda" \
            else ["--model", "seed"] + (["--cpu-caches", "default"] if args.quick else [])
        print(f"\n== {title} ==", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            rows = memory.main(["--device", device, *model, "--out", str(out / name / "memory.json")])
        except Exception as e:
            record_failure(suite, sections, name, title, e)
            continue
        suite["parts"][name] = {"ok": True, "elapsed_s": time.perf_counter() - t0, "rows": rows,
                                "files": {"json": str(out / name / "memory.json")}}
        sections.append(f"## {title}\n\n" + memory.markdown(rows))

    suite["elapsed_s"] = time.perf_counter() - t_suite
    header = (f"# bnfast benchmark suite ({size})\n\nMachine: {suite['machine']['cpu_model']}, "
              f"{suite['machine']['logical_cpus']} logical CPUs, torch {suite['machine']['torch_version']}"
              + (f", GPU {suite['machine']['gpu_name']}" if suite["machine"]["gpu_name"] else "")
              + f". Total {suite['elapsed_s'] / 60:.1f} min.")
    if suite["errors"]:
        header += "\n\n**Errors:**\n" + "\n".join(f"- {e}" for e in suite["errors"])
    summary = header + "\n\n" + "\n\n".join(sections) + "\n"
    suite["files"] = {"summary": str(out / "summary.md"), "json": str(out / "suite.json")}
    write_report(suite, out / "suite.json", out / "summary.md", summary)
    print("\n" + summary)
    print(f"suite results: {out}  ({suite['elapsed_s']:.0f} s)")
    return 1 if suite["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
