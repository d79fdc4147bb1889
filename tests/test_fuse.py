"""bnfast.convert(model, fuse=True) and revert: which patterns are fused (and
which are left, with the reason), results equal to the unfused torch model in
float64 (outputs, every gradient, running statistics, train and eval), and a
fused model's life: optimizers, state_dict, deepcopy, pickling, compile,
revert."""

import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfast
from benchmarks.models import BasicBlock, Bottleneck, resnet18_cifar
from benchmarks.train_cifar import build_model


def summary(model, caplog) -> list[str]:
    """The fusion summary's lines, as convert logs them."""
    with caplog.at_level(logging.INFO, logger="bnfast"):
        caplog.clear()
        converted = bnfast.convert(model, fuse=True)
    lines = caplog.records[-1].getMessage().splitlines()[1:]
    return converted, [line.strip() for line in lines]


def assert_same_training(ref: nn.Module, fused: nn.Module, shape, steps=2) -> None:
    """Outputs, every parameter's gradient and the buffers of ref (torch) and
    fused over training steps and one eval forward, in float64."""
    torch.manual_seed(0)
    for _ in range(steps):
        x = torch.randn(shape, dtype=torch.float64)
        ys = [m(x) for m in (ref, fused)]
        torch.testing.assert_close(ys[1], ys[0])
        for y in ys:
            y.square().sum().backward()
        for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
            # A conv bias before BN has a zero gradient: compare on the weights' scale.
            torch.testing.assert_close(q.grad, p.grad, atol=1e-10, rtol=1e-9, msg=lambda m: f"{name}: {m}")
            p.grad = q.grad = None
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, msg=lambda m: f"{name}: {m}")
    ref.eval(), fused.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(fused(x), ref(x))


MODELS = {
    # the seed CNN: Conv -> ReLU -> BN
    "seed": (lambda: build_model("seed", dropout=0.0), (8, 3, 32, 32), ["2: relu -> BN", "6: relu -> BN",
                                                                         "10: relu -> BN"]),
    "conv_bn_relu": (lambda: build_model("conv_bn_relu", dropout=0.0), (8, 3, 32, 32),
                     ["1: BN -> relu", "5: BN -> relu", "9: BN -> relu"]),
    # torchvision's blocks: a functional forward, one ReLU module called three times, out += identity
    "basic_block": (lambda: BasicBlock(8, 16, stride=2, downsample=nn.Sequential(
        nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))), (4, 8, 10, 10),
        ["bn1: BN -> relu", "bn2: BN + add -> relu", "downsample.1: not fused, no activation it can fuse with"]),
    "bottleneck": (lambda: Bottleneck(16, 4), (4, 16, 7, 7),
                   ["bn1: BN -> relu", "bn2: BN -> relu", "bn3: BN + add -> relu"]),
}


@pytest.mark.parametrize("name", MODELS)
def test_fused_model_trains_like_torch(name, caplog):
    make, shape, expected = MODELS[name]
    torch.manual_seed(1)
    ref = make().double()
    fused, lines = summary(copy.deepcopy(ref), caplog)
    assert lines == expected
    assert type(fused).__name__ == type(ref).__name__ and isinstance(fused, type(ref))
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert_same_training(ref, fused, shape)


def test_resnet18_fuses_every_block(caplog):
    fused, lines = summary(resnet18_cifar(), caplog)
    assert sum("BN + add -> relu" in line for line in lines) == 8
    assert sum("BN -> relu" in line for line in lines) == 9  # the stem and each block's bn1
    assert sum("not fused" in line for line in lines) == 3  # the downsample BNs
    assert all(type(m) is not nn.BatchNorm2d for m in fused.modules())


class Functional(nn.Module):
    """Activations and adds in their functional and method forms, and the
    patterns that must not be fused."""

    def __init__(self):
        super().__init__()
        for i in range(9):
            setattr(self, f"bn{i}", nn.BatchNorm2d(4))
        self.gelu = nn.GELU(approximate="tanh")
        self.leaky = nn.LeakyReLU(0.3, inplace=True)

    def forward(self, x):
        a = F.leaky_relu(self.bn0(x), 0.2)
        b = self.gelu(self.bn1(a))
        c = torch.add(x, self.bn2(b)).relu_()  # residual first, method relu
        d = F.silu(self.bn3(c))
        e = self.bn4(d)
        f = F.gelu(e) + e  # BN output read twice: left
        g = self.bn5(F.relu(f))  # relu -> BN
        h = self.bn6(self.bn6(g))  # called twice: left
        i = self.leaky(self.bn7(h) + 1.0)  # a constant residual: not a tensor, left
        return self.bn8(torch.relu_(x.clone())) + i  # in-place relu of a fresh tensor -> BN


def test_functional_forms_and_what_is_left(caplog):
    torch.manual_seed(2)
    ref = Functional().double()
    fused, lines = summary(copy.deepcopy(ref), caplog)
    assert lines == ["bn0: BN -> leaky_relu(0.2)", "bn1: BN -> gelu_tanh", "bn2: BN + add -> relu", "bn3: BN -> silu",
                     "bn4: not fused, no activation it can fuse with", "bn5: relu -> BN",
                     "bn6: not fused, called more than once or with extra arguments",
                     "bn7: not fused, no activation it can fuse with", "bn8: relu -> BN"]
    assert_same_training(ref, fused, (3, 4, 5, 5))


class InplaceReluOfInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.relu(x))  # the caller's x is changed: not fused


def test_inplace_relu_of_the_input_is_left(caplog):
    fused, lines = summary(InplaceReluOfInput(), caplog)
    assert lines == ["bn: not fused, an in-place relu before it changes a tensor others read"]
    x = torch.randn(6, 3)
    y = fused(x)
    assert (x >= 0).all()  # the caller sees relu's change, as with torch
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return torch.relu(self.bn(x)) if x.sum() > 0 else self.bn(x)


def test_modules_with_hooks_are_not_fused(caplog):
    model = build_model("conv_bn_relu", dropout=0.0)
    seen = []
    model[1].register_forward_hook(lambda m, args, out: seen.append("bn"))
    model[6].register_forward_hook(lambda m, args, out: seen.append("relu"))  # the second BN's relu
    fused, lines = summary(model, caplog)
    assert lines == ["1: not fused, it has hooks, which would see the fused result",
                     "5: not fused, no activation it can fuse with", "9: BN -> relu"]
    fused(torch.randn(2, 3, 32, 32))
    assert seen == ["bn", "relu"]


def test_untraceable_module_is_converted_unfused(caplog):
    fused, lines = summary(DataDependent(), caplog)
    assert len(lines) == 1 and lines[0].startswith("DataDependent: not fused, its forward cannot be traced")
    assert type(fused.bn) is bnfast.BatchNorm1d
    x = torch.randn(5, 3) + 10
    torch.testing.assert_close(fused(x), torch.relu(F.batch_norm(x, None, None, training=True)))


def test_broadcast_residual_is_added_unfused():
    class Bias(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.shift = nn.Parameter(torch.randn(3, 1, 1, dtype=torch.float64))

        def forward(self, x):
            return F.relu(self.bn(x) + self.shift)

    ref = Bias().double()
    fused = bnfast.convert(copy.deepcopy(ref), fuse=True)
    assert fused.bn.act == "relu"
    assert_same_training(ref, fused, (4, 3, 5, 5))


def test_optimizer_and_checkpoints_carry_over():
    torch.manual_seed(3)
    model = build_model("seed", dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before convert
    fused = bnfast.convert(model, fuse=True)
    before = fused[2].weight.detach().clone()
    fused(torch.randn(8, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(fused[2].weight, before)
    torch_model = build_model("seed", dropout=0.0)
    torch_model.load_state_dict(fused.state_dict())  # a fused checkpoint loads into torch's model
    fused.load_state_dict(torch_model.state_dict())


def test_copies_pickles_and_revert():
    torch.manual_seed(4)
    ref = resnet18_cifar().double()
    fused = bnfast.convert(copy.deepcopy(ref), fuse=True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = ref(x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        assert other.layer1[0].bn2.act == "relu"
        torch.testing.assert_close(other(x), expected)
    reverted = bnfast.revert(fused)
    assert type(reverted.layer1[0]) is BasicBlock
    assert {type(m) for m in reverted.modules() if isinstance(m, nn.BatchNorm2d)} == {nn.BatchNorm2d}
    torch.testing.assert_close(reverted(x), expected)
    assert type(bnfast.convert(reverted, fuse=True).layer1[0].bn1) is bnfast.BatchNormAct2d  # and again


def test_slice_of_fused_sequential_refuses_to_run():
    fused = bnfast.convert(build_model("seed"), fuse=True)
    with pytest.raises(RuntimeError, match="without its fused forward"):
        fused[:4](torch.randn(2, 3, 32, 32))


def test_hand_made_batchnormact_survives_revert():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnfast.BatchNormAct2d(4, act="silu"))
    assert type(bnfast.revert(model)[1]) is bnfast.BatchNormAct2d


def test_compile_fullgraph():
    torch.manual_seed(5)
    ref = BasicBlock(4, 4)
    fused = bnfast.convert(copy.deepcopy(ref), fuse=True)
    x = torch.randn(2, 4, 6, 6)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ref(x))
