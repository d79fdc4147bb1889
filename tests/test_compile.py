"""torch.compile(fullgraph=True) of a small model with bnfast layers: same
results as eager (outputs, grads, running stats), and the compiled graphs call
bnfast's ops (forward / backward), not a decomposition."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import bnfast


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = bnfast.BatchNorm2d(4)
        self.bn1d = bnfast.BatchNorm1d(4 * 6 * 6)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.bn1d(x.flatten(1)))


def _step(model, x):
    y = model(x)
    y.square().sum().backward()
    return y


def _compare(backend, device, channels_last=False):
    torch.manual_seed(0)
    eager = Net().to(device)
    compiled_model = copy.deepcopy(eager)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    eager, compiled_model = eager.to(memory_format=fmt), compiled_model.to(memory_format=fmt)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    for i in range(2):
        x = torch.randn(8, 3, 6, 6, device=device).contiguous(memory_format=fmt)
        y_e, y_c = _step(eager, x), _step(compiled, x)
        torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-4)
    for (n, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)
    for (n, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(c, b, atol=1e-6, rtol=1e-5, msg=n)
    eager.eval(), compiled_model.eval()
    x = torch.randn(8, 3, 6, 6, device=device).contiguous(memory_format=fmt)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_compile_aot_eager(channels_last, device):
    torch._dynamo.reset()
    _compare("aot_eager", device, channels_last)


# Inductor compiles C++ here: ~30 s on 2 busy cores, under the ~60 s limit for the default run.
def test_compile_inductor(device):
    torch._dynamo.reset()
    _compare("inductor", device)


def _recording_backend(record):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(kind):
        def fn(gm, example_inputs):
            targets = set()
            for n in gm.graph.nodes:
                if n.op == "call_function":
                    targets.add(n.target)
                    # mutating ops appear wrapped: auto_functionalized(_v2)(op, ...)
                    if n.args and isinstance(n.args[0], torch._ops.OpOverload):
                        targets.add(n.args[0])
            record[kind].append(targets)
            return make_boxed_func(gm.forward)
        return fn

    return aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))


@pytest.mark.gpu_smoke
def test_compiled_graphs_call_bnfast_ops(device):
    """The AOT forward graph calls bnfast::forward, which also updates the
    running statistics (no update_stats_ of its own), and the backward graph
    calls the fused bnfast::backward (not a decomposition into aten ops)."""
    torch._dynamo.reset()
    record = {"fw": [], "bw": []}
    torch.manual_seed(0)
    model = Net().to(device)
    compiled = torch.compile(model, backend=_recording_backend(record), fullgraph=True)
    _step(compiled, torch.randn(8, 3, 6, 6, device=device))
    fw = set().union(*record["fw"])
    bw = set().union(*record["bw"])
    assert torch.ops.bnfast.forward.default in fw, sorted(map(str, fw))
    assert torch.ops.bnfast.update_stats_.default not in fw, sorted(map(str, fw))
    assert torch.ops.bnfast.backward.default in bw, (
        "backward graph does not call bnfast::backward; it contains: " + ", ".join(sorted(map(str, bw))))
    aten_bn = {t for t in fw | bw if "batch_norm" in str(t) and "bnfast" not in str(t)}
    assert not aten_bn, f"aten batch norm ops in the graphs: {aten_bn}"


@pytest.mark.gpu_smoke
def test_compile_eval_graph_calls_elemt(device):
    """Inference: the one-op eval forward (elemt_running) in the graph. With
    gradients wanted (eval mode, trainable parameters): its decomposition,
    elemt, whose backward is bnfast's too."""
    torch._dynamo.reset()
    record = {"fw": [], "bw": []}
    model = Net().to(device).eval()
    compiled = torch.compile(model, backend=_recording_backend(record), fullgraph=True)
    with torch.no_grad():
        compiled(torch.randn(8, 3, 6, 6, device=device))
    fw = set().union(*record["fw"])
    assert torch.ops.bnfast.elemt_running.default in fw, sorted(map(str, fw))

    torch._dynamo.reset()
    record = {"fw": [], "bw": []}
    compiled = torch.compile(model, backend=_recording_backend(record), fullgraph=True)
    compiled(torch.randn(8, 3, 6, 6, device=device)).sum().backward()
    fw, bw = set().union(*record["fw"]), set().union(*record["bw"])
    assert torch.ops.bnfast.elemt.default in fw, sorted(map(str, fw))
    assert torch.ops.bnfast.backward_reduce.default in bw, sorted(map(str, bw))
