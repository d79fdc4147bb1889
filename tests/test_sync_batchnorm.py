"""bnfast.SyncBatchNorm: each rank of a process group gets what ONE process
running torch's BatchNorm on the concatenated batch gets for that rank's slice
(output, input gradient; weight / bias gradients summed over the ranks;
running statistics), step after step; plus the module surface (constructor,
state_dict, errors, convert) and the local fallbacks.

The distributed checks run in spawned gloo process groups of 2 and 3 CPU
ranks, one thread each. Spawning costs seconds, so each group is started once
(a module-scoped fixture) and runs every check of its size in turn; each check
is then reported by its own test. A group that runs past GROUP_TIMEOUT_S is
killed and its tests fail.

On CUDA (a CUDA device among the test devices: the GPU check) a group of 2
ranks on CUDA tensors (gloo; the ranks share the GPU when there is one) runs
the checks named in CUDA_CHECKS, each comparing bnfast's results also with
those of torch.nn.SyncBatchNorm itself on the same ranks. It is one test,
so that a parallel run (pytest-xdist) spawns the group once.

Numerics follow DESIGN rule 7 (tests/reference.py): bnfast's error against a
float64 reference computed on the concatenated batch is at most twice that of
torch's single-process BatchNorm at the same dtype, plus a floor of a few ulps.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import datetime
import gc
import functools
import json
import os
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import bnfast
from bnfast import ops
from bnfast import sync_batchnorm as sbn
from tests import reference as ref
from tests.conftest import DEVICES, _skip_reason
from tests.test_fused_act import SLOPE, UNFUSED
from tests.test_memory_efficient import SavedTensors

EPS = 1e-5
# bnfast and torch.nn.SyncBatchNorm may round differently (sums in other
# orders, torch's counts in the input dtype): this many of dtype's epsilons at
# the result's scale.
SAME_AS_SYNC_ULPS = 16
GROUP_TIMEOUT_S = 240  # a hung collective fails the tests instead of blocking CI
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

# ----------------------------------------------------------------- running the groups

CHECKS = collections.defaultdict(dict)  # group -> {name: check(rank, world_size)}
CUDA = "cuda"  # the group of CUDA ranks; the others are keyed by their world size
GROUP_SIZE = {2: 2, 3: 3, CUDA: 2}


def _check(world_size):
    def register(fn):
        CHECKS[world_size][fn.__name__] = fn
        return fn
    return register


CALLS = collections.Counter()  # collectives issued by bnfast.SyncBatchNorm in this rank
COLLECTIVES = ("_all_gather_stats", "_all_reduce_sums")


def _count_collectives():
    for name in COLLECTIVES:
        fn = getattr(sbn, name)

        @functools.wraps(fn)
        def counted(*args, _fn=fn, _name=name, **kwargs):
            CALLS[_name] += 1
            return _fn(*args, **kwargs)
        setattr(sbn, name, counted)


@contextlib.contextmanager
def _uncounted():
    """bnfast's own collectives, without the counting (a side effect torch.compile cannot trace)."""
    counted = {name: getattr(sbn, name) for name in COLLECTIVES}
    for name, fn in counted.items():
        setattr(sbn, name, fn.__wrapped__)
    try:
        yield
    finally:
        for name, fn in counted.items():
            setattr(sbn, name, fn)


def _worker(rank: int, group: int | str, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    _count_collectives()
    world_size = GROUP_SIZE[group]
    if group == CUDA:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, check in CHECKS[group].items():
            try:
                check(rank, world_size)
                results[name] = None
            except (Exception, pytest.fail.Exception):  # (pytest.raises fails with the latter)
                results[name] = traceback.format_exc()
            dist.barrier()  # the next check starts together on every rank
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        # The checks' DDP models (reference cycles) hold the process group:
        # collected here, the group and its gloo threads go with
        # destroy_process_group. Left to interpreter exit, a gloo thread can be
        # destroyed unjoined and the rank dies with SIGABRT ("terminate called
        # without an active exception"), as benchmarks/ddp.py saw too.
        gc.collect()
        dist.destroy_process_group()


def _run_group(group: int | str, tmp_dir) -> dict:
    """{check name: [error traceback or None, per rank]} of one spawned group."""
    world_size = GROUP_SIZE[group]
    ctx = mp.start_processes(_worker, args=(group, str(tmp_dir / "store"), str(tmp_dir)),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {group} group of {world_size} ranks ran past {GROUP_TIMEOUT_S} s "
                        "(a hung collective?)")
    per_rank = [json.loads((tmp_dir / f"rank{r}.json").read_text()) for r in range(world_size)]
    return {name: [results.get(name, "did not run") for results in per_rank] for name in CHECKS[group]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _run_group(2, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _run_group(3, tmp_path_factory.mktemp("world3"))


def _assert_passed(results: dict, name: str) -> None:
    failed = [f"rank {r}:\n{err}" for r, err in enumerate(results[name]) if err]
    assert not failed, "\n".join(failed)


# ----------------------------------------------------------------- sync vs one process

def _batch(shape, dtype, generator, offset=2.0):
    """x = offset[c] + scale[c] * randn, drawn in float64 and rounded to dtype."""
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    off = (torch.rand(c, generator=generator, dtype=torch.float64) * 2 - 1) * offset
    scale = torch.rand(c, generator=generator, dtype=torch.float64) * 1.5 + 0.5
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale.view(view) + off.view(view)
    return x.to(dtype)


class _Expect(list):
    """Failed comparisons, collected instead of raised so that a rank whose
    results are wrong still issues every collective of the check (its peers
    would wait for it otherwise)."""

    def true(self, condition: bool, message: str) -> None:
        if not condition:
            self.append(message)

    def close(self, *args, **kwargs) -> None:
        """ref.assert_error_within_torch(*args, **kwargs), collected."""
        try:
            ref.assert_error_within_torch(*args, **kwargs)
        except AssertionError as e:
            self.append(str(e))

    def same_as_torch_sync(self, name, ours, theirs, truth, dtype, scale=None) -> None:
        """ours against torch.nn.SyncBatchNorm's result on the same rank: both
        errors against the float64 truth within the rule above, and the two
        equal up to a few roundings of dtype at the result's scale."""
        self.close(f"{name} vs torch SyncBatchNorm", ours, theirs, truth, dtype, scale)
        scale = scale if scale is not None else max(truth.double().abs().max().item() if truth.numel() else 0, 1.0)
        tol = SAME_AS_SYNC_ULPS * torch.finfo(dtype).eps * scale
        try:
            torch.testing.assert_close(ours.double(), theirs.double(), rtol=0, atol=tol)
        except AssertionError as e:
            self.append(f"{name}: bnfast differs from torch SyncBatchNorm beyond {tol:.2e}: {e}")


def _sync_vs_single(rank, sizes, tail, *, channels=4, dtype=torch.float32, params_dtype=None,
                    memory_format=torch.contiguous_format, steps=3, group=None, members=None, device="cpu",
                    **kwargs):
    """Train bnfast.SyncBatchNorm on this rank's slice of each step's batch and
    torch's BatchNorm on the whole batch (sizes[i] samples from members[i],
    default: every rank in order); compare every result of every step with a
    float64 reference, then an eval step on the local slice. A single member
    normalizes locally, without collectives. On CUDA torch.nn.SyncBatchNorm
    trains on the same slices too, and bnfast's error is held to its as well."""
    members = list(range(len(sizes))) if members is None else members
    synced = len(members) > 1
    lo = sum(sizes[:members.index(rank)])
    hi = lo + sizes[members.index(rank)]
    pdt = params_dtype or dtype
    ours = bnfast.SyncBatchNorm(channels, process_group=group, dtype=pdt, device=device, **kwargs)
    theirs = TORCH_BN[2 + len(tail)](channels, dtype=pdt, device=device, **kwargs)
    # torch's own SyncBatchNorm refuses CPU input.
    theirs_sync = (nn.SyncBatchNorm(channels, process_group=group, dtype=pdt, device=device, **kwargs)
                   if synced and torch.device(device).type == "cuda" else None)
    g = torch.Generator().manual_seed(0)
    affine = ours.affine
    if affine:
        weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
        with torch.no_grad():
            for m in (ours, theirs, theirs_sync):
                if m is not None:
                    m.weight.copy_(weight)
                    m.bias.copy_(bias)
    w, b = (ours.weight, ours.bias) if affine else (None, None)
    rm64 = torch.zeros(channels, dtype=torch.float64, device=device)
    rv64 = torch.ones(channels, dtype=torch.float64, device=device)
    expect = _Expect()
    for step in range(steps):
        x_all = _batch((sum(sizes), channels) + tail, dtype, g).to(device)
        dy_all = _batch((sum(sizes), channels) + tail, dtype, g, offset=0.5).to(device)
        x = x_all[lo:hi].contiguous(memory_format=memory_format).requires_grad_()
        dy = dy_all[lo:hi].contiguous(memory_format=memory_format)
        before = CALLS.copy()
        y = ours(x)
        grads = torch.autograd.grad(y, [x] + ([w, b] if affine else []), dy)
        calls = CALLS - before
        expect.true(calls == ({"_all_gather_stats": 1, "_all_reduce_sums": 1} if synced else {}),
                    f"collectives: {calls}")
        expect.true(y.dtype == dtype and y.is_contiguous(memory_format=memory_format),
                    f"output dtype {y.dtype} / layout")

        x_ref = x_all.clone().requires_grad_()
        y_ref = theirs(x_ref)
        grads_ref = torch.autograd.grad(y_ref, [x_ref] + ([theirs.weight, theirs.bias] if affine else []), dy_all)
        if theirs_sync is not None:
            x_sync = x.detach().clone().requires_grad_()
            y_sync = theirs_sync(x_sync)
            grads_sync = torch.autograd.grad(  # None (an empty batch's) as zeros
                y_sync, [x_sync] + ([theirs_sync.weight, theirs_sync.bias] if affine else []), dy,
                materialize_grads=True)

        y64, mean, var, invstd = ref.batch_norm_train(x_all, w, b, EPS)
        dx64, dw64, db64 = ref.batch_norm_train_backward(dy_all, x_all, w, EPS)
        wmax = w.abs().max().item() if affine else 1.0
        dx_scale = dy_all.double().abs().max().item() * invstd.max().item() * wmax
        name = f"step {step}"
        expect.close(f"{name} output", y, y_ref[lo:hi], y64[lo:hi], dtype)
        expect.close(f"{name} grad_input", grads[0], grads_ref[0][lo:hi], dx64[lo:hi], dtype, scale=dx_scale)
        if theirs_sync is not None:
            expect.same_as_torch_sync(f"{name} output", y, y_sync, y64[lo:hi], dtype)
            expect.same_as_torch_sync(f"{name} grad_input", grads[0], grads_sync[0], dx64[lo:hi], dtype,
                                      scale=dx_scale)
        if affine:
            dims = ref.reduce_dims(x_all)
            xhat = (x_all.double() - ref.bcast(mean, x_all)) * ref.bcast(invstd, x_all)
            for i, label, truth, scale in (
                    (1, "grad_weight", dw64, (dy_all.double() * xhat).abs().sum(dims)),
                    (2, "grad_bias", db64, dy_all.double().abs().sum(dims))):
                expect.true(grads[i].dtype == pdt, f"{label} dtype {grads[i].dtype}")
                # Summed over the ranks in float64: the sum adds no error of its own.
                total = grads[i].double()
                total_sync = grads_sync[i].double() if theirs_sync is not None else None
                for t in (total, total_sync) if synced else ():
                    if t is not None:
                        dist.all_reduce(t, group=group)
                expect.close(f"{name} {label}", total, grads_ref[i], truth, pdt, scale.max().item())
                if theirs_sync is not None:
                    expect.same_as_torch_sync(f"{name} {label}", total, total_sync, truth, pdt, scale.max().item())
        if ours.track_running_stats:
            factor = 1.0 / (step + 1) if ours.momentum is None else ours.momentum
            rm64, rv64 = ref.update_stats(rm64, rv64, mean, var, factor, x_all.numel() // channels)
            expect.true(int(ours.num_batches_tracked) == step + 1, "num_batches_tracked")
            for stat, truth in (("running_mean", rm64), ("running_var", rv64)):
                expect.close(f"{name} {stat}", getattr(ours, stat), getattr(theirs, stat), truth, pdt)
                if theirs_sync is not None:
                    expect.same_as_torch_sync(f"{name} {stat}", getattr(ours, stat), getattr(theirs_sync, stat),
                                              truth, pdt)

    # Eval: the running statistics, or without them the local batch's own
    # statistics; no collective either way.
    ours.eval()
    theirs.eval()
    x = _batch((hi - lo + 2, channels) + tail, dtype, g).to(device).contiguous(memory_format=memory_format)
    before = CALLS.copy()
    y = ours(x)
    expect.true(CALLS == before, f"collectives in eval: {CALLS - before}")
    if ours.track_running_stats:
        y64 = ref.batch_norm_eval(x, rm64, rv64, w, b, EPS)
    else:
        y64 = ref.batch_norm_train(x, w, b, EPS)[0]
    expect.close("eval output", y, theirs(x), y64, dtype)
    assert not expect, "\n".join(expect)


@_check(2)
def uneven_batches(rank, world_size, device="cpu"):
    _sync_vs_single(rank, [5, 3], (3, 4), device=device)


@_check(2)
def channels_last(rank, world_size, device="cpu"):
    _sync_vs_single(rank, [4, 4], (5, 3), memory_format=torch.channels_last, device=device)


@_check(2)
def one_rank_empty(rank, world_size, device="cpu"):
    _sync_vs_single(rank, [6, 0], (3, 3), device=device)


@_check(2)
def bfloat16_with_float32_params(rank, world_size, device="cpu"):
    _sync_vs_single(rank, [5, 3], (4, 4), dtype=torch.bfloat16, params_dtype=torch.float32,
                    memory_format=torch.channels_last, device=device)


@_check(2)
def float64(rank, world_size, device="cpu"):
    _sync_vs_single(rank, [3, 4], (2, 5), dtype=torch.float64, device=device)


@_check(2)
def batchnorm1d_2d_input(rank, world_size, device="cpu"):
    _sync_vs_single(rank, [7, 5], (), channels=6, device=device)


@_check(2)
def batchnorm1d_3d_input(rank, world_size):
    _sync_vs_single(rank, [3, 2], (7,))


@_check(2)
def batchnorm3d_input(rank, world_size, device="cpu"):
    _sync_vs_single(rank, [2, 3], (3, 2, 4), channels=3, device=device)


@_check(2)
def momentum_none(rank, world_size, device="cpu"):
    _sync_vs_single(rank, [4, 4], (3, 3), momentum=None, steps=4, device=device)


@_check(2)
def no_affine_no_running_stats(rank, world_size, device="cpu"):
    _sync_vs_single(rank, [4, 2], (3, 3), affine=False, track_running_stats=False, device=device)


@_check(2)
def input_without_grad(rank, world_size):
    """Only the weight and bias need gradients: no input gradient, so no
    all_reduce (on any rank); the parameter gradients are still local."""
    sizes = [5, 3]
    g = torch.Generator().manual_seed(0)
    x_all, dy_all = _batch((8, 3, 4, 4), torch.float32, g), _batch((8, 3, 4, 4), torch.float32, g)
    ours, theirs = bnfast.SyncBatchNorm(3), nn.BatchNorm2d(3)
    lo, hi = (0, 5) if rank == 0 else (5, 8)
    before = CALLS.copy()
    dw, db = torch.autograd.grad(ours(x_all[lo:hi]), [ours.weight, ours.bias], dy_all[lo:hi])
    assert CALLS - before == {"_all_gather_stats": 1}, CALLS - before
    dw_ref, db_ref = torch.autograd.grad(theirs(x_all), [theirs.weight, theirs.bias], dy_all)
    for ours_grad, theirs_grad in ((dw, dw_ref), (db, db_ref)):
        dist.all_reduce(ours_grad)
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-5 * sum(sizes) * 16)


@_check(2)
def global_count_one_raises(rank, world_size):
    """One value per channel over the whole group (1 on rank 0, none on rank 1):
    every rank raises torch's error, none waits in a collective."""
    m = bnfast.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1 - rank, 3))
    # One value on each rank is two over the group: fine.
    assert m(torch.randn(1, 3)).shape == (1, 3)


@_check(2)
def every_rank_empty(rank, world_size):
    """No values anywhere: an empty output, zero gradients and unchanged running
    statistics, as torch's BatchNorm2d gives for an empty batch."""
    ours, theirs = bnfast.SyncBatchNorm(3), nn.BatchNorm2d(3)
    results = []
    for m in (ours, theirs):
        x = torch.zeros(0, 3, 4, 4, requires_grad=True)
        y = m(x)
        results.append((y,) + torch.autograd.grad(y, [x, m.weight, m.bias], torch.zeros_like(y))
                       + (m.running_mean, m.running_var, m.num_batches_tracked))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _ddp_seed_cnn(rank, world_size, fuse):
    """The seed CNN with bnfast.SyncBatchNorm (fuse: SyncBatchNormAct, the
    relu -> BN pairs fused by bnfast.convert, memory_efficient) under DDP,
    2 ranks x 8 images, matches one process of torch's layers trained on the
    16 images: DDP averages the ranks' gradients of their mean losses, which
    with equal batches is the gradient of the mean loss over all 16."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from benchmarks.train_cifar import build_model

    torch.manual_seed(0)
    single = build_model("seed", dropout=0.0)  # no dropout: its masks would differ
    local = copy.deepcopy(single)
    if fuse:
        local = bnfast.convert(local, fuse=True, memory_efficient=True)
    model = DDP(bnfast.SyncBatchNorm.convert_sync_batchnorm(local))
    synced = bnfast.SyncBatchNormAct if fuse else bnfast.SyncBatchNorm
    assert sum(type(m) is synced and m.memory_efficient == fuse for m in model.modules()) == 3
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, single)]
    g = torch.Generator().manual_seed(1)
    per_rank = 8
    for step in range(3):
        x_all = torch.randn(world_size * per_rank, 3, 32, 32, generator=g)
        t_all = torch.randint(0, 10, (world_size * per_rank,), generator=g)
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        losses = []
        for m, opt, x, t in ((model, opts[0], x_all[part], t_all[part]), (single, opts[1], x_all, t_all)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), t)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        dist.all_reduce(losses[0])
        torch.testing.assert_close(losses[0] / world_size, losses[1], rtol=1e-5, atol=1e-6, msg=f"step {step} loss")
    for (name, p), q in zip(single.state_dict().items(), model.module.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@_check(2)
def ddp_seed_cnn(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from benchmarks.train_cifar import build_model

    # Why bnfast.SyncBatchNorm does not subclass torch.nn.SyncBatchNorm:
    # DDP refuses a CPU module holding one.
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model("seed")))
    _ddp_seed_cnn(rank, world_size, fuse=False)


@_check(2)
def ddp_seed_cnn_fused(rank, world_size):
    _ddp_seed_cnn(rank, world_size, fuse=True)


def _compiled_fullgraph(rank, eager, residual):
    """torch.compile(fullgraph=True) traces the synchronized step, collectives
    included, and gives eager's results."""
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        inputs = [torch.randn(3 + rank, 4, 3, 3, generator=g).requires_grad_() for _ in range(1 + residual)]
        dy = torch.randn(inputs[0].shape, generator=g)
        results = []
        for m, module in ((eager, eager), (compiled, compiled_module)):
            with _uncounted():
                y = m(*inputs)
                results.append((y,) + torch.autograd.grad(y, inputs + [module.weight, module.bias], dy))
        for a, b in zip(*results):
            torch.testing.assert_close(b, a)
    for a, b in zip(eager.buffers(), compiled_module.buffers()):
        torch.testing.assert_close(b, a)


@_check(2)
def compiled_fullgraph(rank, world_size):
    _compiled_fullgraph(rank, bnfast.SyncBatchNorm(4), residual=False)


@_check(2)
def compiled_fullgraph_fused(rank, world_size):
    _compiled_fullgraph(rank, bnfast.SyncBatchNormAct(4, act="silu"), residual=True)


@_check(2)
def compiled_fullgraph_memory_efficient(rank, world_size):
    """memory_efficient, which a traced call cannot use (it keeps the input)."""
    _compiled_fullgraph(rank, bnfast.SyncBatchNormAct(4, act="leaky_relu", memory_efficient=True), residual=True)


# ----------------------------------------------------------------- fused activations

def _unfused(bn, act, x, residual):
    """torch's layers in sequence: act(bn(x) + residual), or bn(relu(x))."""
    if act == "pre_relu":
        return bn(torch.relu(x))
    return UNFUSED[act](bn(x) if residual is None else bn(x) + residual)


def _fused_vs_single(rank, sizes, tail, act, *, residual=False, input_grad=True, channels=4, dtype=torch.float32,
                     params_dtype=None, memory_format=torch.contiguous_format, steps=2, device="cpu",
                     memory_efficient=False):
    """bnfast.SyncBatchNormAct on this rank's slice against torch's BatchNorm
    and activation (and residual add) on the whole batch in one process, and
    both against the same in float64: output, gradients of the input (unless
    input_grad is False), the residual, weight and bias (summed over the
    ranks), running statistics, step after step; then an eval step on the
    local slice. On CUDA also against torch.nn.SyncBatchNorm and the
    activation on the same slices. memory_efficient: the layer's mode (with
    a negative weight element, so 1 / weight is negative there), and backward
    must keep the output, not the input."""
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    pdt = params_dtype or dtype
    ours = bnfast.SyncBatchNormAct(channels, act=act, negative_slope=SLOPE, dtype=pdt, device=device,
                                   memory_efficient=memory_efficient)
    theirs = TORCH_BN[2 + len(tail)](channels, dtype=pdt, device=device)
    truth = TORCH_BN[2 + len(tail)](channels, dtype=torch.float64, device=device)
    theirs_sync = (nn.SyncBatchNorm(channels, dtype=pdt, device=device)
                   if torch.device(device).type == "cuda" else None)  # torch's refuses CPU input
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    if memory_efficient:
        weight[0] = -weight[0]
    with torch.no_grad():
        for m in (ours, theirs, truth, theirs_sync):
            if m is not None:
                m.weight.copy_(weight)
                m.bias.copy_(bias)
    shape = (sum(sizes), channels) + tail
    expect = _Expect()
    for step in range(steps):
        x_all, dy_all = _batch(shape, dtype, g).to(device), _batch(shape, dtype, g, offset=0.5).to(device)
        r_all = _batch(shape, dtype, g).to(device) if residual else None
        local = [t[lo:hi].contiguous(memory_format=memory_format).requires_grad_() if t is not None else None
                 for t in (x_all, r_all)]
        local[0].requires_grad_(input_grad)
        inputs = [t for t in local if t is not None]
        before = CALLS.copy()
        with SavedTensors() as saved:
            y = ours(*inputs)
        expect.true((saved.keeps(y), saved.keeps(local[0])) == (memory_efficient, not memory_efficient),
                    f"kept for backward: output {saved.keeps(y)}, input {saved.keeps(local[0])}")
        wanted = [t for t in inputs if t.requires_grad] + [ours.weight, ours.bias]
        grads = torch.autograd.grad(y, wanted, dy_all[lo:hi].contiguous(memory_format=memory_format))
        if not input_grad:
            grads = (None,) + grads
        collectives = {"_all_gather_stats": 1, "_all_reduce_sums": 1} if input_grad else {"_all_gather_stats": 1}
        expect.true(CALLS - before == collectives, f"collectives: {CALLS - before}")
        expect.true(y.dtype == dtype and y.is_contiguous(memory_format=memory_format), "output dtype / layout")
        results = []
        for bn, cast in ((theirs, lambda t: t), (truth, lambda t: t.double())):
            whole = [cast(t).requires_grad_() for t in (x_all, r_all) if t is not None]
            out = _unfused(bn, act, whole[0], whole[1] if residual else None)
            results.append((out,) + torch.autograd.grad(out, whole + [bn.weight, bn.bias], cast(dy_all)))
        if theirs_sync is not None:  # the local slices, as ours
            mine = [t[lo:hi].contiguous(memory_format=memory_format).requires_grad_() for t in (x_all, r_all)
                    if t is not None]
            out = _unfused(theirs_sync, act, mine[0], mine[1] if residual else None)
            sync = (out,) + torch.autograd.grad(out, mine + [theirs_sync.weight, theirs_sync.bias],
                                                dy_all[lo:hi].contiguous(memory_format=memory_format),
                                                materialize_grads=True)  # None (an empty batch's) as zeros
        scale = dy_all.double().abs().max().item() * 10  # the gradients' natural magnitude, for cancellation
        outs = [y] + list(grads)
        for i, label in enumerate(["output", "grad_input"] + (["grad_residual"] if residual else [])):
            if outs[i] is None:
                continue
            expect.close(f"step {step} {label}", outs[i], results[0][i][lo:hi], results[1][i][lo:hi], dtype,
                         scale=None if i == 0 else scale)
            if theirs_sync is not None:
                expect.same_as_torch_sync(f"step {step} {label}", outs[i], sync[i], results[1][i][lo:hi], dtype,
                                          scale=None if i == 0 else scale)
        for j, label in enumerate(("grad_weight", "grad_bias")):
            total = grads[len(inputs) + j].double()
            dist.all_reduce(total)
            expect.close(f"step {step} {label}", total, results[0][len(inputs) + 1 + j],
                         results[1][len(inputs) + 1 + j], pdt, scale=scale * sum(sizes))
            if theirs_sync is not None:
                total_sync = sync[len(inputs) + 1 + j].double()
                dist.all_reduce(total_sync)
                expect.same_as_torch_sync(f"step {step} {label}", total, total_sync,
                                          results[1][len(inputs) + 1 + j], pdt, scale=scale * sum(sizes))
        for name in ("running_mean", "running_var"):
            expect.close(f"step {step} {name}", getattr(ours, name), getattr(theirs, name), getattr(truth, name), pdt)
            if theirs_sync is not None:
                expect.same_as_torch_sync(f"step {step} {name}", getattr(ours, name), getattr(theirs_sync, name),
                                          getattr(truth, name), pdt)
    ours.eval(), theirs.eval(), truth.eval()
    x = _batch((hi - lo + 2, channels) + tail, dtype, g).to(device).contiguous(memory_format=memory_format)
    r = _batch(x.shape, dtype, g).to(device) if residual else None
    before = CALLS.copy()
    y = ours(x, r) if residual else ours(x)
    expect.true(CALLS == before, f"collectives in eval: {CALLS - before}")
    expect.close("eval output", y, _unfused(theirs, act, x, r),
                 _unfused(truth, act, x.double(), r.double() if residual else None), dtype)
    assert not expect, "\n".join(expect)


@_check(2)
def fused_relu(rank, world_size, device="cpu"):
    _fused_vs_single(rank, [5, 3], (3, 4), "relu", device=device)


@_check(2)
def fused_add_relu_channels_last(rank, world_size, device="cpu"):
    _fused_vs_single(rank, [4, 4], (5, 3), "relu", residual=True, memory_format=torch.channels_last, device=device)


@_check(2)
def fused_leaky_relu_one_rank_empty(rank, world_size, device="cpu"):
    _fused_vs_single(rank, [6, 0], (3, 3), "leaky_relu", device=device)


@_check(2)
def fused_residual_one_rank_empty_input_without_grad(rank, world_size, device="cpu"):
    """Only the residual, weight and bias need gradients: no all_reduce, and
    grad_residual from the elementwise op alone; one rank's batch empty."""
    _fused_vs_single(rank, [0, 5], (3, 3), "silu", residual=True, input_grad=False, device=device)


@_check(2)
def fused_silu_gelu_identity_with_residual(rank, world_size, device="cpu"):
    for act in ("silu", "gelu", "gelu_tanh", "identity"):
        _fused_vs_single(rank, [3, 4], (2, 5), act, residual=True, steps=1, device=device)


@_check(2)
def fused_pre_relu(rank, world_size, device="cpu"):
    _fused_vs_single(rank, [5, 3], (4, 4), "pre_relu", device=device)


@_check(2)
def fused_bfloat16_with_float32_params(rank, world_size, device="cpu"):
    _fused_vs_single(rank, [5, 3], (4, 4), "relu", residual=True, dtype=torch.bfloat16,
                     params_dtype=torch.float32, memory_format=torch.channels_last, device=device)


@_check(2)
def fused_memory_efficient(rank, world_size, device="cpu"):
    """memory_efficient=True: the gradients from the kept output, for each
    activation whose output determines the normalized input."""
    _fused_vs_single(rank, [5, 3], (3, 4), "identity", memory_efficient=True, device=device)
    _fused_vs_single(rank, [4, 4], (5, 3), "leaky_relu", residual=True, memory_format=torch.channels_last,
                     memory_efficient=True, device=device)
    _fused_vs_single(rank, [6, 0], (3, 3), "pre_relu", dtype=torch.float64, memory_efficient=True, device=device)
    _fused_vs_single(rank, [0, 5], (3, 3), "leaky_relu", residual=True, input_grad=False, memory_efficient=True,
                     steps=1, device=device)  # the residual's, weight's and bias's gradients only


@_check(2)
def fused_memory_efficient_bfloat16(rank, world_size, device="cpu"):
    """The same in bfloat16: z rebuilt in float32 from the rounded output
    (leaky_relu and a residual), or the output itself. The output's rounding
    bounds what is recovered from it, so the parameters' gradients are held to
    bfloat16's precision: bfloat16 parameters, as tests/test_memory_efficient.py
    holds the local mode (float32 ones would be held to float32's)."""
    _fused_vs_single(rank, [5, 3], (4, 4), "leaky_relu", residual=True, dtype=torch.bfloat16,
                     memory_format=torch.channels_last, memory_efficient=True, device=device)
    _fused_vs_single(rank, [3, 5], (4, 4), "identity", dtype=torch.bfloat16, memory_efficient=True, device=device)


@_check(2)
def memory_efficient_without_affine(rank, world_size):
    """No weight or bias: z is the output itself (weight 1, bias 0); the
    results of the mode keeping the input."""
    g = torch.Generator().manual_seed(0)
    x_all, dy_all = _batch((8, 3, 4, 4), torch.float32, g), _batch((8, 3, 4, 4), torch.float32, g)
    lo, hi = (0, 5) if rank == 0 else (5, 8)
    results = []
    for memory_efficient in (True, False):
        m = bnfast.SyncBatchNormAct(3, act="identity", affine=False, memory_efficient=memory_efficient)
        x = x_all[lo:hi].clone().requires_grad_()
        with SavedTensors() as saved:
            y = m(x)
        assert saved.keeps(y) == memory_efficient and saved.keeps(x) != memory_efficient
        results.append((y, torch.autograd.grad(y, x, dy_all[lo:hi])[0], m.running_mean, m.running_var))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@_check(2)
def memory_efficient_keeps_the_input_where_it_must(rank, world_size):
    """Where the output does not determine the normalized input (relu; a zero,
    NaN or extreme weight element) memory_efficient keeps the input and warns,
    with the results of the layer without the mode."""
    g = torch.Generator().manual_seed(0)
    x_all, dy_all = _batch((8, 3, 4, 4), torch.float32, g), _batch((8, 3, 4, 4), torch.float32, g)
    lo, hi = (0, 5) if rank == 0 else (5, 8)
    for act, weight, why in (("relu", [1.0, 2.0, 0.5], "not invertible"),
                             ("leaky_relu", [1.0, 0.0, 0.5], "extreme element"),
                             ("identity", [1.0, float("nan"), 1e20], "extreme element")):
        results = []
        for memory_efficient in (True, False):
            m = bnfast.SyncBatchNormAct(3, act=act, negative_slope=SLOPE, memory_efficient=memory_efficient)
            with torch.no_grad():
                m.weight.copy_(torch.tensor(weight))
            x = x_all[lo:hi].clone().requires_grad_()
            with SavedTensors() as saved, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y = m(x)
            assert saved.keeps(x) and not saved.keeps(y), act
            assert any(why in str(w.message) for w in caught) == memory_efficient, [str(w.message) for w in caught]
            results.append((y,) + torch.autograd.grad(y, [x, m.weight, m.bias], dy_all[lo:hi]))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@_check(2)
def fused_residual_broadcast(rank, world_size):
    """A residual unlike the input (here one that broadcasts) is added as torch
    adds it, after the synchronized batch norm: the unfused result."""
    g = torch.Generator().manual_seed(0)
    x_all = _batch((8, 3, 4, 4), torch.float32, g)
    r = torch.randn(3, 1, 1, generator=g)
    ours, theirs = bnfast.SyncBatchNormAct(3, act="leaky_relu", negative_slope=SLOPE), nn.BatchNorm2d(3)
    lo, hi = (0, 5) if rank == 0 else (5, 8)
    x = x_all[lo:hi].clone().requires_grad_()
    r_ours, r_theirs = r.clone().requires_grad_(), r.clone().requires_grad_()
    dy = torch.randn(x_all.shape, generator=g)
    y = ours(x, r_ours)
    x_theirs = x_all.clone().requires_grad_()
    y_theirs = UNFUSED["leaky_relu"](theirs(x_theirs) + r_theirs)
    torch.testing.assert_close(y, y_theirs[lo:hi])
    grads = torch.autograd.grad(y, [x, r_ours, ours.weight, ours.bias], dy[lo:hi])
    grads_theirs = torch.autograd.grad(y_theirs, [x_theirs, r_theirs, theirs.weight, theirs.bias], dy)
    torch.testing.assert_close(grads[0], grads_theirs[0][lo:hi])
    for ours_grad, theirs_grad in zip(grads[1:], grads_theirs[1:]):  # summed over the ranks
        dist.all_reduce(ours_grad)
        torch.testing.assert_close(ours_grad, theirs_grad)


@_check(3)
def three_ranks_one_empty(rank, world_size):
    _sync_vs_single(rank, [5, 0, 2], (3, 3), memory_format=torch.channels_last)


@_check(3)
def subset_group(rank, world_size):
    """World 3, groups {0, 2} and {1} (every rank creates both, in order):
    ranks 0 and 2 synchronize with each other only; rank 1, alone in its
    group, and outside {0, 2}, normalizes locally."""
    pair, alone = dist.new_group([0, 2]), dist.new_group([1])
    if rank == 1:
        for group in (alone, pair):
            _sync_vs_single(rank, [3], (4, 4), group=group, members=[1], steps=2)
    else:
        _sync_vs_single(rank, [2, 5], (4, 4), group=pair, members=[0, 2])


# The checks that also run on CUDA ranks, there against torch.nn.SyncBatchNorm as well.
CUDA_CHECKS = ("uneven_batches", "channels_last", "one_rank_empty", "bfloat16_with_float32_params", "float64",
               "batchnorm1d_2d_input", "batchnorm3d_input", "momentum_none", "no_affine_no_running_stats",
               "fused_relu", "fused_add_relu_channels_last", "fused_leaky_relu_one_rank_empty",
               "fused_residual_one_rank_empty_input_without_grad", "fused_silu_gelu_identity_with_residual",
               "fused_pre_relu", "fused_bfloat16_with_float32_params", "fused_memory_efficient",
               "fused_memory_efficient_bfloat16")
for _name in CUDA_CHECKS:
    CHECKS[CUDA][_name] = functools.partial(CHECKS[2][_name], device="cuda")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CHECKS[2]))
def test_two_ranks(two_ranks, name):
    _assert_passed(two_ranks, name)


def _cuda_skip_reason():
    cuda = [d for d in DEVICES if torch.device(d).type == "cuda"]
    return _skip_reason(cuda[0]) if cuda else "no CUDA device among the test devices (BNFAST_TEST_DEVICES)"


@pytest.mark.gpu_smoke
@pytest.mark.distributed
def test_cuda_ranks(tmp_path):
    """CUDA_CHECKS on 2 CUDA ranks (gloo), against one process and torch.nn.SyncBatchNorm."""
    reason = _cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    results = _run_group(CUDA, tmp_path)
    failed = [f"{name}, rank {r}:\n{err}" for name, errs in results.items() for r, err in enumerate(errs) if err]
    assert not failed, "\n".join(failed)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CHECKS[3]))
def test_three_ranks(three_ranks, name):
    _assert_passed(three_ranks, name)


# ----------------------------------------------------------------- one process

CTOR_ARGS = [dict(), dict(eps=1e-3, momentum=None), dict(affine=False), dict(track_running_stats=False),
             dict(dtype=torch.float64), dict(process_group="a group")]


@pytest.mark.parametrize("kwargs", CTOR_ARGS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_constructor_matches_torch(kwargs):
    ours, theirs = bnfast.SyncBatchNorm(3, **kwargs), nn.SyncBatchNorm(3, **kwargs)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "process_group", "training"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert repr(ours) == repr(theirs)
    assert ours._version == theirs._version
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)


def test_state_dict_round_trip():
    """torch's SyncBatchNorm -> bnfast's -> torch's BatchNorm2d and SyncBatchNorm,
    with trained (non-default) statistics, and bnfast's training continuing on them."""
    theirs = nn.SyncBatchNorm(3, momentum=None)
    for _ in range(3):
        theirs(torch.randn(4, 3, 5, 5) * 2 + 1)  # no process group: torch's local path
    ours = bnfast.SyncBatchNorm(3, momentum=None)
    ours.load_state_dict(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    x = torch.randn(4, 3, 5, 5)
    ours(x), theirs(x)
    for target in (nn.BatchNorm2d(3, momentum=None), nn.SyncBatchNorm(3, momentum=None)):
        target.load_state_dict(ours.state_dict())
        for k, v in theirs.state_dict().items():
            torch.testing.assert_close(target.state_dict()[k], v, msg=k)


@pytest.mark.parametrize(("shape", "training"), [((3,), True), ((3,), False), ((), True), ((2, 0, 4), True),
                                                 ((2, 0, 4), False), ((1, 3), True), ((1, 3, 1, 1), True)],
                         ids=["1D", "1D-eval", "0D", "no_channels", "no_channels-eval", "one_value", "one_value_4D"])
def test_errors_match_torch(shape, training):
    """Without a process group torch's SyncBatchNorm runs on the CPU too, so
    its errors can be compared directly: same type, same message."""
    errors = []
    for cls in (bnfast.SyncBatchNorm, nn.SyncBatchNorm):
        m = cls(shape[1] if len(shape) > 1 and shape[1] else 3).train(training)
        with pytest.raises(Exception) as info:
            m(torch.randn(shape))
        errors.append(info.value)
    ours, theirs = errors
    assert type(ours) is type(theirs) is ValueError
    assert str(ours) == str(theirs)


LOCAL_TWINS = [(lambda: bnfast.SyncBatchNorm(3), lambda: bnfast.BatchNorm2d(3), False),
               (lambda: bnfast.SyncBatchNormAct(3, act="leaky_relu", negative_slope=0.2),
                lambda: bnfast.BatchNormAct2d(3, act="leaky_relu", negative_slope=0.2), False),
               (lambda: bnfast.SyncBatchNormAct(3), lambda: bnfast.BatchNormAct2d(3), True),
               (lambda: bnfast.SyncBatchNormAct(3, act="pre_relu"), lambda: bnfast.BatchNormAct2d(3, act="pre_relu"),
                False)]


@pytest.mark.parametrize(("make_ours", "make_local", "residual"), LOCAL_TWINS,
                         ids=["plain", "leaky_relu", "add_relu", "pre_relu"])
def test_without_process_group_is_batchnorm(make_ours, make_local, residual):
    """No process group: bnfast's BatchNorm2d (BatchNormAct2d for
    SyncBatchNormAct) exactly, in training and eval."""
    ours, local = make_ours(), make_local()
    for step in range(3):
        inputs = [(torch.randn(5, 3, 4, 4) * 2 + 1).requires_grad_() for _ in range(1 + residual)]
        dy = torch.randn(inputs[0].shape)
        results = []
        for m in (ours, local):
            y = m(*inputs)
            results.append((y,) + torch.autograd.grad(y, inputs + [m.weight, m.bias], dy))
        for a, b in zip(*results):
            assert torch.equal(a, b), step
    for a, b in zip(ours.state_dict().values(), local.state_dict().values()):
        assert torch.equal(a, b)
    ours.eval(), local.eval()
    inputs = [torch.randn(2, 3, 4, 4) for _ in range(1 + residual)]
    assert torch.equal(ours(*inputs), local(*inputs))


def test_sync_batchnorm_act_surface():
    """SyncBatchNormAct: SyncBatchNorm's state_dict keys, the activation in its
    repr, and BatchNormAct2d's errors for an unknown activation and a
    residual with pre_relu."""
    ours = bnfast.SyncBatchNormAct(3, act="leaky_relu", negative_slope=0.2, process_group="a group")
    assert list(ours.state_dict()) == list(nn.SyncBatchNorm(3).state_dict())
    assert ours.process_group == "a group"
    assert repr(ours) == repr(nn.SyncBatchNorm(3)).replace("SyncBatchNorm", "SyncBatchNormAct")[:-1] + (
        ", act='leaky_relu', negative_slope=0.2)")
    assert repr(bnfast.SyncBatchNormAct(3, act="identity", memory_efficient=True)).endswith(
        "act='identity', memory_efficient=True)")
    for make in (bnfast.SyncBatchNormAct, bnfast.BatchNormAct2d):
        with pytest.raises(ValueError, match="unknown activation 'tanh'"):
            make(3, act="tanh")
        x = torch.randn(2, 3, 4, 4)
        with pytest.raises(ValueError, match="cannot be combined with act='pre_relu'"):
            make(3, act="pre_relu")(x, x)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_group_of_one_is_local(one_rank_group):
    """A process group of one rank: the local path, no collectives, also under
    torch.compile(fullgraph=True)."""
    ours, local = bnfast.SyncBatchNorm(3), bnfast.BatchNorm2d(3)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    gather = sbn._all_gather_stats
    sbn._all_gather_stats = None  # calling it would raise
    try:
        for step in range(2):
            x = torch.randn(5, 3, 4, 4).requires_grad_()
            y, y_local = compiled(x), local(x)
            torch.testing.assert_close(y, y_local)
            torch.testing.assert_close(torch.autograd.grad(y.sum(), x), torch.autograd.grad(y_local.sum(), x))
    finally:
        sbn._all_gather_stats = gather
    for a, b in zip(ours.state_dict().values(), local.state_dict().values()):
        torch.testing.assert_close(a, b)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), bnfast.BatchNorm2d(4, momentum=None))
        self.flat = nn.Flatten()
        self.bn1d = nn.BatchNorm1d(4 * 4 * 4, affine=False)
        self.bn3d = nn.BatchNorm3d(2, track_running_stats=False)
        self.sync = nn.SyncBatchNorm(4, eps=1e-3)


def test_convert_sync_batchnorm_and_revert():
    model = Net()
    model.features[1].eval()
    before = dict(model.named_modules())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    group = "a group"
    converted = bnfast.SyncBatchNorm.convert_sync_batchnorm(model, group)
    assert converted is model
    for name, m in model.named_modules():
        if isinstance(before[name], nn.modules.batchnorm._BatchNorm):
            assert type(m) is bnfast.SyncBatchNorm and m.process_group == group, name
            for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
                assert getattr(m, attr) == getattr(before[name], attr), (name, attr)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert type(bnfast.revert(model).features[1]) is nn.SyncBatchNorm
    assert type(bnfast.convert(model).features[1]) is bnfast.SyncBatchNorm  # torch's SyncBatchNorm -> bnfast's
    single = bnfast.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(3))
    assert type(single) is bnfast.SyncBatchNorm


def test_convert_sync_batchnorm_keeps_activations():
    """BatchNormAct layers, made by hand or fused by bnfast.convert, become
    SyncBatchNormAct with their activation (torch's conversion would make them
    plain SyncBatchNorm and lose it), sharing parameters and buffers, and
    with their memory_efficient mode."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2),
                          bnfast.BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2), nn.BatchNorm2d(4), nn.SiLU())
    bnfast.convert(model, fuse=True)
    params = dict(model.named_parameters())
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    bnfast.SyncBatchNorm.convert_sync_batchnorm(model, "a group")
    synced = [m for m in model if isinstance(m, bnfast.SyncBatchNorm)]
    assert [(type(m), m.act) for m in synced] == [(bnfast.SyncBatchNormAct, "pre_relu"),
                                                  (bnfast.SyncBatchNormAct, "leaky_relu"),
                                                  (bnfast.SyncBatchNormAct, "silu")]
    assert synced[1].negative_slope == 0.2 and all(m.process_group == "a group" for m in synced)
    assert all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # no process group: the same local kernels
    synced = bnfast.SyncBatchNormAct.convert_sync_batchnorm(bnfast.BatchNormAct2d(4, memory_efficient=True))
    assert type(synced) is bnfast.SyncBatchNormAct and synced.act == "relu" and synced.memory_efficient

    class ForeignBatchNormAct(nn.BatchNorm2d):  # another library's (timm's): its act is a module
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.ReLU()
    synced = bnfast.SyncBatchNorm.convert_sync_batchnorm(ForeignBatchNormAct(4))
    assert type(synced) is bnfast.SyncBatchNorm and synced.act is None  # as torch's conversion: a plain SyncBatchNorm


def test_convert_fuses_sync_batchnorm(capsys):
    """convert(fuse=True) fuses torch's SyncBatchNorm (swapped for bnfast's)
    with its activation into a SyncBatchNormAct; revert gives torch's back."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 3),
                          nn.SyncBatchNorm(4))
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)  # no process group: torch's SyncBatchNorm runs locally on the CPU
    bnfast.convert(model, fuse=True, verbose=True, memory_efficient=True)
    assert "1: BN -> leaky_relu(0.2)\n" in capsys.readouterr().out
    assert type(model[1]) is bnfast.SyncBatchNormAct and model[1].act == "leaky_relu" and model[1].memory_efficient
    assert type(model[4]) is bnfast.SyncBatchNorm
    torch.testing.assert_close(model(x), expected)
    bnfast.revert(model)
    assert type(model[1]) is nn.SyncBatchNorm and type(model[4]) is nn.SyncBatchNorm
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("count", [0, 1, 2, 37])
@pytest.mark.parametrize(("stats_dtype", "running_dtype"), [(torch.float32, torch.float32),
                                                            (torch.float32, torch.bfloat16),
                                                            (torch.float64, torch.float64)],
                         ids=["f32", "f32-bf16_running", "f64"])
def test_update_running_stats_on_device_is_update_stats(count, stats_dtype, running_dtype):
    """The tensor-count update (CUDA, torch.compile) is update_stats_'s, here on CPU tensors."""
    g = torch.Generator().manual_seed(count)
    mean = torch.randn(5, generator=g, dtype=stats_dtype)
    invstd = torch.rand(5, generator=g, dtype=stats_dtype) + 0.5
    running = [torch.randn(5, generator=g).to(running_dtype), torch.rand(5, generator=g).to(running_dtype) + 0.5]
    expected = [t.clone() for t in running]
    ops.update_stats_(*expected, mean, invstd, 0.1, EPS, count)
    sbn.update_running_stats_on_device(*running, mean, invstd, 0.1, EPS, torch.tensor(float(count), dtype=stats_dtype))
    for a, b in zip(running, expected):
        torch.testing.assert_close(a, b, equal_nan=True)
