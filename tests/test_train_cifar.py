"""Tests for benchmarks/train_cifar.py: model shapes, a short real-data
training smoke test, bnfast tracking torch step by step, the --quick CLI run
and the no-data fallback (step times only, never an accuracy)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import bnfast
import pytest
import torch
from torch import nn

from benchmarks import cifar10, train_cifar

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "cifar10" / "cifar-10-python.tar.gz"
SKIP_REASON = f"real CIFAR-10 archive not found at {ARCHIVE} (CI provides it)"
BN_VARIANTS = ("seed", "conv_bn_relu")


@pytest.fixture(scope="module")
def subset():
    """First 512 training images, uint8, and their labels."""
    if not ARCHIVE.is_file():
        pytest.skip(SKIP_REASON)
    d = cifar10.read(ARCHIVE)
    return d.train_images[:512].clone(), d.train_labels[:512].clone()


@pytest.mark.parametrize("variant", train_cifar.VARIANTS)
def test_model_shapes(variant):
    model = train_cifar.build_model(variant)
    seen = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    out = model(torch.rand(128, 3, 32, 32))
    assert out.shape == (128, 10)
    expected = [] if variant == "no_bn" else [(128, 32, 30, 30), (128, 64, 13, 13), (128, 64, 4, 4)]
    assert seen == expected
    kinds = [type(m).__name__ for m in model]
    if variant == "seed":
        assert kinds[:3] == ["Conv2d", "ReLU", "BatchNorm2d"]
    elif variant == "conv_bn_relu":
        assert kinds[:3] == ["Conv2d", "BatchNorm2d", "ReLU"]


@pytest.mark.data
def test_loss_decreases(subset):
    x, y = subset
    torch.manual_seed(0)
    model = train_cifar.build_model("seed")
    rec = train_cifar.train(model, x, y, epochs=4, seed=0, progress=False)
    first, last = rec["epochs"][0]["mean_train_loss"], rec["epochs"][-1]["mean_train_loss"]
    assert len(rec["step_time_s"]) == 16 and rec["median_step_ms"] > 0
    assert last < first - 0.1, (first, last)
    assert rec["final_test_acc"] is None  # no test set given: nothing measured, nothing reported


@pytest.mark.data
@pytest.mark.parametrize("variant", BN_VARIANTS)
def test_bnfast_tracks_torch(subset, variant):
    x, y = subset
    # Dropout off: the comparison is about BN numerics, not mask luck.
    models = train_cifar.make_models(variant, ["torch", "bnfast"], seed=1, dropout=0.0,
                                     bnfast_mod=bnfast)
    t, f = models["torch"], models["bnfast"]
    # Otherwise this would compare torch with itself.
    assert not any(type(m) is nn.BatchNorm2d for m in f.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in t.modules()) == 3
    for pt, pf in zip(t.parameters(), f.parameters(), strict=True):
        assert torch.equal(pt, pf)  # same initial weights
    rt = train_cifar.train(t, x, y, epochs=3, seed=1, progress=False)
    rf = train_cifar.train(f, x, y, epochs=3, seed=1, progress=False)
    lt, lf = torch.tensor(rt["step_loss"]), torch.tensor(rf["step_loss"])
    assert len(lt) == len(lf) == 12
    assert abs(lt[0] - lf[0]) < 1e-5  # same weights, same batch: forward agrees
    # Rounding differences grow over steps (a manual-formula BN drifted ~1e-3
    # by step 12); merely another data order moves these losses by ~0.08.
    assert torch.allclose(lf, lt, rtol=0, atol=1e-2), (lt - lf).abs().max()
    assert lt[-4:].mean() < lt[:4].mean()  # and it is actually learning


def test_lockstep_equals_training_alone():
    # Each run keeps its own RNG stream, so stepping models in lockstep gives
    # them the same dropout masks as training each alone would.
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (384, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (384,), generator=g)
    torch.manual_seed(5)
    base = train_cifar.build_model("seed", dropout=0.5)
    a, b, c = (copy.deepcopy(base) for _ in range(3))
    together = train_cifar.train_together({"a": a, "b": b}, x, y, epochs=2, seed=7, progress=False)
    alone = train_cifar.train(c, x, y, epochs=2, seed=7, progress=False)
    assert len(alone["step_loss"]) == 6
    assert together["a"]["step_loss"] == together["b"]["step_loss"] == alone["step_loss"]


@pytest.mark.data
def test_quick_cli_end_to_end(tmp_path):
    if not ARCHIVE.is_file():
        pytest.skip(SKIP_REASON)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_cifar", "--quick", "--data", str(ARCHIVE),
         "--out", str(out), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "cifar10_results.json").read_text())
    assert {r["name"] for r in res["runs"]} == {
        "seed/torch", "seed/bnfast", "conv_bn_relu/torch", "conv_bn_relu/bnfast", "no_bn"}
    for r in res["runs"]:
        assert r["median_step_ms"] > 0 and len(r["epochs"]) == 1
        assert 0 <= r["final_test_acc"] <= 100
    assert res["data"]["n_train"] == train_cifar.QUICK["subset"] and not res["data"]["synthetic"]
    assert res["machine"]["torch_threads"] >= 1 and res["machine"]["torch_version"]
    s = _row(res, "seed")
    assert s["speedup"] > 0 and s["acc_diff_points"] is not None and s["bn_share_torch"] is not None
    assert s["loss_agreement"]["max"] < 1e-2  # fp32 lockstep runs on one batch order
    for png in ("cifar10_curves.png", "cifar10_times.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "cifar10_summary.md").read_text()
    assert "| seed | torch |" in md and "speed-up" in md
    assert res["summary"]["bar"]["accuracy_met"] is None and "not judged (1 epoch(s)" in md
    assert "| seed | torch |" in proc.stdout  # summary printed too


def _row(result, variant, precision="fp32"):
    return next(r for r in result["summary"]["rows"] if (r["variant"], r["precision"]) == (variant, precision))


def _fake_run(variant, impl, step_ms, acc, epochs, seed=0, losses=(2.0, 1.5, 1.0), model="seed"):
    return {"model": model, "variant": variant, "impl": impl, "precision": "fp32", "batch_size": 128,
            "image_size": 32, "seed": seed, "data": "cifar10", "median_step_ms": step_ms,
            "step_time_s": [step_ms / 1e3] * len(losses), "step_loss": list(losses),
            "final_test_acc": acc, "epochs": [{}] * epochs}


@pytest.mark.parametrize("epochs, acc_bnfast, met", [(5, 60.0, None), (10, 70.5, True), (10, 68.0, False)])
def test_accuracy_bar_is_judged_on_the_full_run(epochs, acc_bnfast, met):
    runs = [_fake_run("seed", "torch", 30.0, 70.0, epochs), _fake_run("seed", "bnfast", 25.0, acc_bnfast, epochs)]
    bar = train_cifar.summarize(runs)["bar"]
    assert bar["accuracy_met"] is met and bar["speedup_met"] is False


def test_no_data_reports_step_times_but_no_accuracy(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "SHARED_ARCHIVE", tmp_path / "absent.tar.gz")
    res = train_cifar.run({"out": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
                           "no_download": True, "variants": "seed,no_bn", "synthetic_steps": 4,
                           "no_progress": True})
    assert res["data"]["synthetic"] and "not found" in res["data"]["reason"]
    assert [r["name"] for r in res["runs"]] == ["seed/torch", "seed/bnfast", "no_bn"]
    for r in res["runs"]:
        assert r["median_step_ms"] > 0 and len(r["step_time_s"]) == 4
        assert r["final_test_acc"] is None
        assert all(e["test_acc"] is None for e in r["epochs"])
    s = _row(res, "seed")
    assert s["speedup"] > 0 and s["acc_diff_points"] is None
    assert s["no_bn_ceiling"] == pytest.approx(s["torch_step_ms"] / s["no_bn_step_ms"])
    assert res["summary"]["bar"]["accuracy_met"] is None
    md = (tmp_path / "out" / "cifar10_summary.md").read_text()
    assert "No accuracy is reported" in md and "not measured" in md
    assert not (tmp_path / "out" / "cifar10_curves.png").exists()
    assert (tmp_path / "out" / "cifar10_times.png").exists()


def test_quick_defaults_yield_to_explicit_flags():
    a = train_cifar.resolve_options({"quick": True, "subset": 300})
    assert a.subset == 300 and a.epochs == 1 and a.test_subset == train_cifar.QUICK["test_subset"]
    b = train_cifar.resolve_options({})
    assert b.subset is None and b.epochs == train_cifar.DEFAULT_EPOCHS
    assert b.variants == list(train_cifar.VARIANTS) and b.impls == ["torch", "bnfast"]
    # The CPU default is the seed CNN, fp32, batch 128, seed 0, on the CPU.
    assert b.cases == [train_cifar.Case("seed", "fp32", 128, 32)] and b.seeds == [0] and b.device == "cpu"
    with pytest.raises(ValueError, match="unknown"):
        train_cifar.resolve_options({"variants": "seed,bogus"})
