"""Swap torch's BatchNorm layers for bnfast's in a model, and back; with
fuse=True, also fuse each batch norm with the activation (or residual add and
activation) next to it.

Fusion works one module at a time: the module's own forward is traced by
torch.fx with every child as an opaque call, the BN -> activation,
BN + add -> activation and relu -> BN patterns among its children are
rewritten into calls of a bnfast.BatchNormAct*d, and the module's class is
swapped for a subclass (same name, still an instance of the original class)
whose forward runs the rewritten code. The module keeps its children,
parameters, buffers, state_dict keys, hooks and attributes; the activation
modules stay as (unused) children, and `revert` swaps the class back.
"""

from __future__ import annotations

import dataclasses
import functools
import linecache
import logging
import operator
from collections import Counter
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnfast.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                            BatchNormAct3d, _BatchNormAct)
from bnfast.sync_batchnorm import SyncBatchNorm, SyncBatchNormAct

_LOG = logging.getLogger("bnfast")

_TO_BNFAST = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.SyncBatchNorm: SyncBatchNorm,
}
_TO_TORCH = {v: k for k, v in _TO_BNFAST.items()}
_TO_FUSED = {BatchNorm1d: BatchNormAct1d, BatchNorm2d: BatchNormAct2d, BatchNorm3d: BatchNormAct3d,
             SyncBatchNorm: SyncBatchNormAct}
_TO_PLAIN = {v: k for k, v in _TO_FUSED.items()}


def _retyped(module: nn.Module, cls: type, **attributes) -> nn.Module:
    """A new module object of class cls sharing module's state: the same
    Parameter and buffer tensors (so optimizers built before the swap still
    work), requires_grad, training flag, hooks, device and dtype."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for name in ("act", "negative_slope", "memory_efficient"):  # BatchNormAct's own attributes
        new.__dict__.pop(name, None)
    new.__dict__.update(attributes)
    return new


def _swap(module: nn.Module, mapping) -> nn.Module:
    cls = mapping.get(type(module))  # exact types: user subclasses stay
    if cls is not None:
        module = _retyped(module, cls)
    for name, child in module.named_children():
        swapped = _swap(child, mapping)
        if swapped is not child:
            module._modules[name] = swapped
    return module


# ---------------------------------------------------------------------------- fusion patterns

@dataclasses.dataclass(frozen=True)
class Fusion:
    """One batch norm child fused with its neighbours: `bn` is its name in the
    parent, act/negative_slope the BatchNormAct's, residual whether the add of
    BN + add -> act is fused too."""
    bn: str
    act: str
    negative_slope: float = 0.01
    residual: bool = False

    def describe(self) -> str:
        if self.act == "pre_relu":
            return "relu -> BN"
        act = f"leaky_relu({self.negative_slope})" if self.act == "leaky_relu" else self.act
        return f"BN + add -> {act}" if self.residual else f"BN -> {act}"


_GELU = {"none": "gelu", "tanh": "gelu_tanh"}
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_INPLACE_FUNCTIONS = (torch.relu_, F.relu_, torch._C._nn.leaky_relu_)
_LEAKY_FUNCTIONS = (F.leaky_relu, torch._C._nn.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu_)
_GELU_FUNCTIONS = (F.gelu, torch._C._nn.gelu)
_ADDS = (operator.add, operator.iadd, torch.add)


def _argument(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _has_hooks(m: nn.Module) -> bool:
    """Module hooks would see the fused result (or never run): such modules are not fused."""
    return any(getattr(m, name, None) for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                   "_backward_pre_hooks"))


def _activation(node: fx.Node, module: nn.Module) -> Optional[tuple[str, float, bool]]:
    """(act, negative_slope, in place) when node applies an activation bnfast
    fuses to its first argument and nothing else; None otherwise."""
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return None
        m = module.get_submodule(node.target)
        if _has_hooks(m):
            return None
        kind = type(m)
        if kind is nn.ReLU:
            return "relu", 0.01, m.inplace
        if kind is nn.LeakyReLU:
            return "leaky_relu", float(m.negative_slope), m.inplace
        if kind is nn.SiLU:
            return "silu", 0.01, m.inplace
        if kind is nn.GELU and m.approximate in _GELU:
            return _GELU[m.approximate], 0.01, False
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
            return "relu", 0.01, node.target == "relu_"
        return None
    if node.op != "call_function":
        return None
    target = node.target
    inplace = target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace", False) is True
    if target in _RELU_FUNCTIONS:
        act, slope, parameters = "relu", 0.01, {"inplace"}
    elif target in _LEAKY_FUNCTIONS:
        slope = _argument(node, 1, "negative_slope", 0.01)
        if len(node.args) > 2 or type(slope) not in (int, float):
            return None
        act, slope, parameters = "leaky_relu", float(slope), {"negative_slope", "inplace"}
    elif target is F.silu:
        act, slope, parameters = "silu", 0.01, {"inplace"}
    elif target in _GELU_FUNCTIONS:
        approximate = _argument(node, 1, "approximate", "none")
        if approximate not in _GELU or len(node.args) > 2:
            return None
        act, slope, parameters = _GELU[approximate], 0.01, {"approximate"}
    else:
        return None
    if set(node.kwargs) - parameters or (act not in ("leaky_relu", "gelu", "gelu_tanh") and len(node.args) != 1):
        return None
    return act, slope, inplace


def _residual_of(add: fx.Node, bn: fx.Node) -> Optional[fx.Node]:
    """The other operand when `add` computes bn + other (either order) without
    changing other in place; None otherwise."""
    if len(add.args) != 2:
        return None
    if add.op == "call_function" and add.target in _ADDS and not add.kwargs:
        operands = add.args
    elif add.op == "call_method" and add.target in ("add", "add_") and not add.kwargs:
        if add.target == "add_" and add.args[0] is not bn:  # other.add_(bn) changes other
            return None
        operands = add.args
    else:
        return None
    other = operands[1] if operands[0] is bn else operands[0]
    if other is bn or not isinstance(other, fx.Node) or bn not in operands:
        return None
    return other


@dataclasses.dataclass
class _Match:
    fusion: Fusion
    bn: fx.Node
    input: fx.Node                # what the fused call reads (the relu's input for pre_relu)
    residual: Optional[fx.Node]
    replaced: list                # nodes the fused call replaces, last one first


def _matches(graph: fx.Graph, module: nn.Module, candidates: Callable[[str], bool]) -> tuple[list, dict]:
    """The fusable patterns around the batch norm children for which
    candidates(name) holds, and why each other candidate is left alone."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    found, left = [], {}
    used: set = set()
    bns = [n for n in graph.nodes if n.op == "call_module" and "." not in n.target and candidates(n.target)]
    for bn in bns:
        if calls[bn.target] != 1 or len(bn.args) != 1 or bn.kwargs or not isinstance(bn.args[0], fx.Node):
            left[bn.target] = "called more than once or with extra arguments"
            continue
        if _has_hooks(module.get_submodule(bn.target)):
            left[bn.target] = "it has hooks, which would see the fused result"
            continue
        users = list(bn.users)
        if len(users) != 1:
            continue
        user = users[0]
        activation = _activation(user, module) if user.args[0] is bn else None
        if activation is not None:
            act, slope, _ = activation
            found.append(_Match(Fusion(bn.target, act, slope), bn, bn.args[0], None, [user, bn]))
            used.add(user)
            continue
        residual = _residual_of(user, bn)
        if residual is not None and len(user.users) == 1:
            after = next(iter(user.users))
            activation = _activation(after, module) if after.args[0] is user else None
            if activation is not None:
                act, slope, _ = activation
                found.append(_Match(Fusion(bn.target, act, slope, residual=True), bn, bn.args[0], residual,
                                    [after, user, bn]))
                used.add(after)
    fused = {m.bn for m in found}
    for bn in bns:
        if bn in fused or bn.target in left:
            continue
        relu = bn.args[0]
        activation = _activation(relu, module) if isinstance(relu, fx.Node) else None
        if activation is None or activation[0] != "relu" or relu in used or len(relu.users) != 1:
            left[bn.target] = "no activation it can fuse with"
            continue
        source = relu.args[0]
        # An in-place relu also changes its input for every other reader (and
        # for the caller when it is the module's input): only fuse it when
        # nothing else can see that.
        if activation[2] and (not isinstance(source, fx.Node) or source.op == "placeholder" or len(source.users) != 1):
            left[bn.target] = "an in-place relu before it changes a tensor others read"
            continue
        found.append(_Match(Fusion(bn.target, "pre_relu"), bn, source, None, [bn, relu]))
        used.add(relu)
    return found, left


def _rewrite(graph: fx.Graph, matches: list) -> None:
    # A match's input or residual may be the last node of a match rewritten
    # before it: follow the replacements.
    replacement: dict = {}

    def current(node):
        while node in replacement:
            node = replacement[node]
        return node

    for m in matches:
        last = m.replaced[0]
        with graph.inserting_before(last):
            args = (current(m.input),) if m.residual is None else (current(m.input), current(m.residual))
            fused = graph.call_module(m.fusion.bn, args)
        last.replace_all_uses_with(fused)
        replacement[last] = fused
        for node in m.replaced:
            graph.erase_node(node)
    graph.lint()


def _compile(graph: fx.Graph, name: str) -> Callable:
    """The graph as a Python function forward(self, ...)."""
    code = graph.python_code(root_module="self")
    filename = f"<bnfast fused forward of {name}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    scope = dict(code.globals)
    exec(compile(code.src, filename, "exec"), scope)  # noqa: S102 - code generated by torch.fx from the module
    return scope["forward"]


class _ChildrenAsCalls(fx.Tracer):
    """Traces one module's own forward: every child is an opaque call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _fused_forward(self, *args, **kwargs):
    forward = self.__dict__.get("_bnfast_forward")
    if forward is None:
        # e.g. a slice of a fused nn.Sequential: its BatchNormAct children
        # would apply their activation again.
        raise RuntimeError(f"bnfast: this {type(self).__name__} was built from a module that bnfast.convert "
                           "fused (a slice or copy of its children?) without its fused forward; call "
                           "bnfast.revert on the model first, or convert the new module itself")
    return forward(self, *args, **kwargs)


def _restore_fused(cls: type, state: dict, fusions: tuple) -> nn.Module:
    """Unpickling (and deepcopy) of a fused module: the original class, then fused again."""
    module = cls.__new__(cls)
    module.__setstate__(state)
    _fuse_children(module, fusions)
    return module


def _fused_reduce(self, protocol):
    state = {k: v for k, v in self.__dict__.items() if k not in ("_bnfast_forward", "_bnfast_fusions")}
    return _restore_fused, (type(self).__bases__[0], state, self._bnfast_fusions)


@functools.lru_cache(maxsize=None)
def _fused_class(cls: type) -> type:
    """cls with the fused forward: same name and module, a subclass of cls."""
    return type(cls.__name__, (cls,), {"forward": _fused_forward, "__reduce_ex__": _fused_reduce,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                       "_bnfast_fused": True})


def _fuse_children(module: nn.Module, fusions: Optional[tuple] = None,
                   memory_efficient: bool = False) -> dict[str, str]:
    """Fuse the batch norm children of one module: all that match a pattern
    (fusions None), or exactly the given ones (after unpickling). Returns what
    became of each candidate, by name, in the order the forward calls them."""
    graph = _ChildrenAsCalls().trace(module)
    if fusions is None:
        candidates = lambda name: type(module._modules.get(name)) in _TO_FUSED  # noqa: E731
    else:
        names = {f.bn for f in fusions}
        candidates = names.__contains__
    matches, left = _matches(graph, module, candidates)
    if fusions is not None and tuple(m.fusion for m in matches) != tuple(fusions):
        raise RuntimeError(f"bnfast: the forward of {type(module).__name__} no longer has the fused patterns "
                           f"{[f.describe() for f in fusions]}; convert the unfused model again")
    described = {m.fusion.bn: m.fusion.describe() for m in matches}
    described.update({name: f"not fused, {why}" for name, why in left.items()})
    order = [n.target for n in graph.nodes if n.op == "call_module" and n.target in described]
    outcome = {name: described[name] for name in dict.fromkeys(order)}
    if not matches:
        return outcome
    _rewrite(graph, matches)
    for m in matches:
        bn = module._modules[m.fusion.bn]
        if type(bn) in _TO_FUSED:
            module._modules[m.fusion.bn] = _retyped(bn, _TO_FUSED[type(bn)], act=m.fusion.act,
                                                    negative_slope=m.fusion.negative_slope,
                                                    memory_efficient=memory_efficient)
    module.__dict__["_bnfast_forward"] = _compile(graph, type(module).__qualname__)
    module.__dict__["_bnfast_fusions"] = tuple(m.fusion for m in matches)
    module.__class__ = _fused_class(type(module))
    return outcome


def _is_fused(module: nn.Module) -> bool:
    return getattr(type(module), "_bnfast_fused", False) and "_bnfast_fusions" in module.__dict__


def _fuse(model: nn.Module, memory_efficient: bool) -> list[str]:
    """Fuse every module of model whose children include a bnfast batch norm;
    the summary lines."""
    lines = []
    for name, module in list(model.named_modules()):
        if _is_fused(module) or not any(type(c) in _TO_FUSED for c in module.children()):
            continue
        where = name or type(model).__name__
        try:
            outcome = _fuse_children(module, memory_efficient=memory_efficient)
        except Exception as error:  # noqa: BLE001 - any trace failure leaves the module unfused, said why
            lines.append(f"{where}: not fused, its forward cannot be traced by torch.fx "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
            continue
        prefix = f"{name}." if name else ""
        lines += [f"{prefix}{bn}: {what}" for bn, what in outcome.items()]
    return lines


def _unfuse(model: nn.Module) -> None:
    for module in list(model.modules()):
        if not _is_fused(module):
            continue
        for fusion in module.__dict__.pop("_bnfast_fusions"):
            bn = module._modules[fusion.bn]
            module._modules[fusion.bn] = _retyped(bn, _TO_PLAIN[type(bn)])
        del module.__dict__["_bnfast_forward"]
        module.__class__ = type(module).__bases__[0]


# ---------------------------------------------------------------------------- API

def convert(module: nn.Module, fuse: bool = False, verbose: bool = False, memory_efficient: bool = False) -> nn.Module:
    """Return module with every torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm
    replaced, recursively, by bnfast's drop-in (sharing parameters and
    buffers). The module is changed in place where a child is replaced; a BN
    module passed itself is returned as a new bnfast module.

    fuse=True also fuses each bnfast BatchNorm1d/2d/3d with its neighbours
    into a BatchNormAct*d, where the module that holds it computes

        act(bn(x))           act: nn.ReLU, LeakyReLU, SiLU, GELU or the
                             functional / method forms (F.relu, x.relu_(), ...)
        act(bn(x) + other)   torchvision's residual blocks (out += identity)
        bn(relu(x))          the relu -> BN order (e.g. Conv -> ReLU -> BN)

    and nothing else reads the intermediate results. nn.Sequential chains and
    modules whose forward calls the activation functionally are both found
    (torch.fx traces each module's own forward). The summary of what was fused
    and what was left (and why) goes to the "bnfast" logger at INFO level, or
    is printed with verbose=True. Fused modules keep their class (a subclass
    of the same name), children and state_dict keys; the fused-away activation
    modules stay as unused children. bnfast SyncBatchNorm layers (torch's,
    once swapped) are fused the same way, into SyncBatchNormAct.

    memory_efficient=True (with fuse=True) makes the fused modules keep their
    output for backward instead of their input where that is exact
    (bnfast.batch_norm_act says when).
    """
    if memory_efficient and not fuse:
        raise ValueError("bnfast.convert: memory_efficient=True applies to fused batch norms; pass fuse=True too")
    module = _swap(module, _TO_BNFAST)
    if fuse:
        lines = _fuse(module, memory_efficient)
        summary = "bnfast.convert(fuse=True):\n  " + ("\n  ".join(lines) if lines else "no batch norm to fuse")
        _LOG.info(summary)
        if verbose:
            print(summary)
    return module


def to_sync(module: nn.Module, process_group=None) -> nn.Module:
    """bnfast.SyncBatchNorm.convert_sync_batchnorm: every batch norm layer of
    module (any torch.nn.modules.batchnorm._BatchNorm, as torch's conversion
    takes) becomes a bnfast.SyncBatchNorm over process_group, or a
    SyncBatchNormAct with the same activation and memory_efficient where it
    is a bnfast BatchNormAct (fused by convert or built by hand), sharing its
    state (_retyped)."""
    if isinstance(module, (_BatchNormAct, SyncBatchNormAct)):
        return _retyped(module, SyncBatchNormAct, process_group=process_group, act=module.act,
                        negative_slope=module.negative_slope, memory_efficient=module.memory_efficient)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _retyped(module, SyncBatchNorm, process_group=process_group)
    for name, child in module.named_children():
        synced = to_sync(child, process_group)
        if synced is not child:
            module._modules[name] = synced
    return module


def revert(module: nn.Module) -> nn.Module:
    """Inverse of convert: what convert fused is unfused (modules get their own
    class and forward back) and bnfast BatchNorm layers become torch's again
    (for export). BatchNormAct modules created by hand have no torch
    equivalent and stay."""
    _unfuse(module)
    return _swap(module, _TO_TORCH)
