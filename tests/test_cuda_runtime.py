"""CUDA-only runtime behaviour, run on CUDA devices of the `device` fixture.

* CUDA-graph capture and replay of a training step of a model with bnfast
  layers: the kernels must never synchronize with the host.
* Concurrent streams: every launch goes to the current stream (a kernel on
  another stream would race with the work queued before it).
* 64-bit indexing: a tensor of more than 2**31 elements.

There is no CPU counterpart of these properties, so each test skips on CPU
devices; the GPU check (benchmarks/gpu_check.sh) runs them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import bnfast

pytestmark = pytest.mark.gpu_smoke

OPS = torch.ops.bnfast
EPS = 1e-5


def _cuda_only(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type != "cuda":
        pytest.skip("CUDA graphs, streams and > 2**31-element tensors are tested on CUDA devices only")
    return dev


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bnfast.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), bnfast.BatchNorm1d(8 * 10 * 10), nn.Linear(8 * 10 * 10, 4)).to(device)


def _step(model, x):
    """A training step without the optimizer: outputs and parameter gradients."""
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    return y, grads


def test_cuda_graph_capture_and_replay(device):
    dev = _cuda_only(device)
    model = _model(dev)
    static_x = torch.randn(16, 3, 10, 10, device=dev)
    # Warm up on a side stream, as torch.cuda.graph requires.
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            _step(model, static_x)
    torch.cuda.current_stream(dev).wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, static_grads = _step(model, static_x)

    for seed in range(3):
        new_x = torch.randn(16, 3, 10, 10, device=dev, generator=torch.Generator(dev).manual_seed(seed))
        reference = copy.deepcopy(model)  # same parameters and running statistics as before the replay
        y, grads = _step(reference, new_x)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize(dev)
        # NB: cuDNN may pick a different (or non-deterministic) convolution
        # algorithm inside the graph, hence a tolerance above float32 rounding.
        torch.testing.assert_close(static_y, y, rtol=1e-5, atol=1e-5)
        for got, want in zip(static_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # The replayed forward updated the running statistics as eager did.
        for got, want in zip(model.buffers(), reference.buffers()):
            torch.testing.assert_close(got, want)


def test_ops_follow_the_current_stream(device):
    dev = _cuda_only(device)
    x = torch.randn(64, 32, 24, 24, device=dev)
    new_x = torch.randn_like(x) * 3 + 1
    expected_y, expected_mean, expected_invstd = OPS.forward(new_x, None, None, EPS)
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        torch.cuda._sleep(20_000_000)  # keep the stream busy, so a kernel on any other stream would win the race
        x.copy_(new_x)
        y, mean, invstd = OPS.forward(x, None, None, EPS)
    torch.cuda.current_stream(dev).wait_stream(stream)
    torch.testing.assert_close(mean, expected_mean, rtol=0, atol=0)
    torch.testing.assert_close(invstd, expected_invstd, rtol=0, atol=0)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=0)


def test_concurrent_streams_match_serial(device):
    dev = _cuda_only(device)
    gen = torch.Generator(dev).manual_seed(0)
    inputs = [torch.randn(32, 16, 20, 20, device=dev, generator=gen) for _ in range(4)]
    grads_out = [torch.randn_like(x) for x in inputs]

    def work(x, dy):
        y, mean, invstd = OPS.forward(x, None, None, EPS)
        dx, _, _ = OPS.backward(dy, x, mean, invstd, None)
        return y, dx

    serial = [work(x, dy) for x, dy in zip(inputs, grads_out)]
    streams = [torch.cuda.Stream(dev) for _ in inputs]
    concurrent = [None] * len(inputs)
    for i, (x, dy, stream) in enumerate(zip(inputs, grads_out, streams)):
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            concurrent[i] = work(x, dy)
    for stream in streams:
        torch.cuda.current_stream(dev).wait_stream(stream)
    for (y, dx), (y_ref, dx_ref) in zip(concurrent, serial):  # deterministic kernels: bitwise equal
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)


def test_more_than_2_31_elements(device):
    dev = _cuda_only(device)
    need = 8 * (2**31 + 2**20)  # x and y in bfloat16 and the float32 copy of x
    if torch.cuda.get_device_properties(dev).total_memory < need + (8 << 30):
        pytest.skip("needs about 25 GB of GPU memory")
    shape = (2, 4, 2**28 + 2**17)  # 2**31 + 2**20 elements: indices past 2**31 in both channels-first passes
    x = torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=torch.Generator(dev).manual_seed(0))
    y, mean, invstd = OPS.forward(x, None, None, EPS)
    dims = (0, 2)
    x32 = x.float()
    torch.testing.assert_close(mean, x32.mean(dims), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(invstd, torch.rsqrt(x32.var(dims, unbiased=False) + EPS), rtol=1e-3, atol=1e-3)
    del x32
    tail = (slice(None), slice(None), slice(-4096, None))  # the last elements of every plane
    want = ((x[tail].float() - mean.view(1, -1, 1)) * invstd.view(1, -1, 1)).bfloat16()
    torch.testing.assert_close(y[tail], want, rtol=0.02, atol=0.02)
