"""The bytes ledger: ``python -m fastarch ledger MODEL --batch B [--train] [--dtype bf16]
[--json PATH]``.

For one forward (eval, no grad) or, with ``--train``, one training step (forward, cross
entropy, backward, SGD-with-momentum update), every kernel that runs, with the bytes it must
read and write, beside the same count for PyTorch eager's kernel sequence on the same model:
how a change's gain is predicted before a GPU measures it. Nothing runs on real data: both
models run on meta tensors (shapes only), channels_last, fastarch fused as the benchmarks run
it, eager as ``inventory.torch_twin``.

How the kernels are found. A ``TorchDispatchMode`` sees every operator below autograd, the
backward's included. A ``fastarch::`` operator runs its real implementation (not its fake
function) on the meta tensors, so it builds exactly the launches a GPU would get (static
tiles: autotuning does not run on meta tensors; an H100's 132 SMs size split reductions);
each ``Launch`` is checked and recorded instead of launched. Any other ATen operator (the
optimizer, the loss, a copy) is a kernel of torch's, counted by ``aten_kernels``, which
also writes down eager's CUDA sequence per layer type (cuDNN convolution, BatchNorm,
pools ...). Views and allocations are no kernels.

How bytes are counted: each tensor argument once, its elements x its itemsize, as read if
the kernel loads through it and as written if it stores through it (both: counted twice).
For a fastarch launch the elements are its ``Extent`` (what the kernel indexes through the
pointer) and loads and stores are read off the kernel's source (``pointer_roles``); for an
ATen kernel the tensor's elements, an output written, an input read, an argument the schema
marks as mutated read and written (overwritten only, by copy_ / fill_ / zero_).

Attribution: a row carries the layer (leaf module path) whose parameter or buffer its
operator takes, else the block around it: a block is a conv or linear layer and the layers
after it up to the next one (the unit fastarch fuses). In the forward an operator without
parameters belongs to the block of the last one with, in the backward (which runs in reverse)
to the next one's. The loss and the optimizer are their own blocks.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import inspect
import json
import math
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch._library.custom_ops import OPDEFS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastarch import arguments, backend, models
from fastarch.inventory import DTYPES, Leaf, torch_twin, trace_leaves
from fastarch.kernels import runtime
from fastarch.kernels.launch import Launch

# The image each model takes (channels, height, width).
IMAGES = {"lenet5": (1, 32, 32), "alexnet": (3, 224, 224), "vgg16": (3, 224, 224),
          "vgg16_bn": (3, 224, 224)}
PHASES = ("forward", "loss", "backward", "optimizer")


@dataclass(frozen=True)
class Row:
    """One kernel: its name, the layer it belongs to (the block's name where no parameter
    says), the block, the phase, and the bytes it reads and writes."""
    kernel: str
    module: str
    block: str
    phase: str
    read: int
    written: int

    @property
    def bytes(self) -> int:
        return self.read + self.written


# ----------------------------------------------------------------------------- fastarch launches

def _is_call(node: ast.AST, names: tuple[str, ...]) -> bool:
    """``node`` calls ``tl.<name>`` or ``<anything>.<name>`` for a name in ``names``."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
        node.func.attr in names


def _names_in(expr: ast.AST, aliases: dict[str, set[str]]) -> set[str]:
    """The parameters an expression's pointer can derive from: the names in it, through
    ``aliases``, not looking inside loads (a loaded value is data, not an address)."""
    found: set[str] = set()
    stack = [expr]
    while stack:
        node = stack.pop()
        if _is_call(node, ("load",)):
            continue
        if isinstance(node, ast.Name):
            found |= aliases.get(node.id, set())
        stack.extend(ast.iter_child_nodes(node))
    return found


def _aliases(function: ast.FunctionDef, params: list[str]) -> dict[str, set[str]]:
    """Every local name -> the parameters it can hold a pointer into (to a fixpoint)."""
    aliases = {p: {p} for p in params}
    assignments = [node for node in ast.walk(function)
                   if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))]
    changed = True
    while changed:
        changed = False
        for node in assignments:
            if node.value is None:
                continue
            sources = _names_in(node.value, aliases)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in (n.id for n in ast.walk(target) if isinstance(n, ast.Name)):
                    if not sources <= aliases.setdefault(name, set()):
                        aliases[name] |= sources
                        changed = True
    return aliases


@functools.lru_cache(maxsize=None)
def pointer_roles(fn: Any) -> dict[str, frozenset[str]]:
    """For each parameter of the Triton kernel (or helper) whose Python function is ``fn``:
    {"load"}, {"store"} or both, as its source (and the jit helpers it calls, followed
    through their parameters) loads or stores through it, directly, through a local pointer
    derived from it or through a tensor descriptor made from it."""
    function = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    params = [a.arg for a in function.args.args]
    aliases = _aliases(function, params)
    roles: dict[str, set[str]] = {p: set() for p in params}

    def mark(expr: ast.AST, role: str) -> None:
        for param in _names_in(expr, aliases):
            roles[param].add(role)

    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        if _is_call(node, ("load", "store")) and node.args:
            attribute = node.func
            role = attribute.attr
            if isinstance(attribute.value, ast.Name) and attribute.value.id == "tl":
                mark(node.args[0], role)
            else:  # a tensor descriptor's load / store
                mark(attribute.value, role)
        elif (helper := _resolve(node.func, fn)) is not None:
            helper_roles = pointer_roles(helper)
            helper_params = list(helper_roles)
            bound = list(zip(helper_params, node.args)) + [
                (k.arg, k.value) for k in node.keywords if k.arg in helper_roles]
            for name, expr in bound:
                for role in helper_roles[name]:
                    mark(expr, role)
    return {p: frozenset(r) for p, r in roles.items()}


def _resolve(callee: ast.AST, fn: Any) -> Optional[Any]:
    """The Python function of the jit helper ``callee`` names in ``fn``'s module, if any."""
    scope: Any = None
    if isinstance(callee, ast.Name):
        scope = fn.__globals__.get(callee.id)
    elif isinstance(callee, ast.Attribute) and isinstance(callee.value, ast.Name):
        module = fn.__globals__.get(callee.value.id)
        scope = getattr(module, callee.attr, None) if inspect.ismodule(module) else None
    inner = getattr(scope, "fn", None)
    return inner if inspect.isfunction(inner) else None


def launch_bytes(launch: Launch) -> tuple[int, int]:
    """(read, written) bytes of one launch: each tensor argument's extent elements x its
    itemsize, read where the kernel loads through it, written where it stores."""
    roles = pointer_roles(launch.kernel.fn)
    read = written = 0
    for name, t in launch.args.items():
        if not isinstance(t, torch.Tensor):
            continue
        size = math.prod(launch.extents[name].shape) * t.element_size()
        role = roles.get(name, frozenset())
        if size and not role:
            raise ValueError(f"{launch.name}: {name} is neither loaded nor stored in "
                             f"{launch.kernel.fn.__name__}'s source, as far as it can be read")
        read += size if "load" in role else 0
        written += size if "store" in role else 0
    return read, written


# ----------------------------------------------------------------------------- ATen kernels

# Operators that launch nothing: allocations and metadata (views are found by their schema).
NO_KERNEL = frozenset(("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                       "detach", "lift_fresh", "alias", "_unsafe_view", "set_", "resize_",
                       "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel"))
# In-place operators whose mutated argument is overwritten, not read.
OVERWRITES = frozenset(("copy_", "fill_", "zero_"))
# Arguments an operator takes for their shape only (its CUDA kernel never reads them).
SHAPE_ONLY = {"max_pool2d_with_indices_backward": ("self",),
              "_adaptive_avg_pool2d_backward": ("self",), "avg_pool2d_backward": ("self",),
              "nll_loss_backward": ("self",)}

Kernel = tuple[str, int, int]  # name, bytes read, bytes written


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _bound(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The operator's arguments by schema name."""
    names = [a.name for a in func._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


def _tensors(values: Sequence[Any]) -> int:
    return sum(_nbytes(v) for v in values if v is not None)


def _one_kernel(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> Kernel:
    """An operator as one kernel: inputs read, fresh outputs written, a mutated argument
    read and written (only written when overwritten)."""
    bound = _bound(func, args, kwargs)
    name = func._schema.name.split("::")[-1]
    skip = SHAPE_ONLY.get(name, ())
    read = written = 0
    for argument in func._schema.arguments:
        value = bound.get(argument.name)
        if argument.name in skip or value is None:
            continue
        size = _nbytes(value)
        mutated = argument.alias_info is not None and argument.alias_info.is_write
        written += size if mutated else 0
        read += size if not (mutated and name in OVERWRITES) else 0
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    for ret, value in zip(func._schema.returns, outputs):
        if ret.alias_info is None:
            written += _nbytes(value)
    return f"aten::{name}", read, written


def _convolution(b: dict, y: torch.Tensor) -> list[Kernel]:
    """cuDNN's forward (x and w in, y out), then the bias added in place (ATen's
    ``output.add_(bias)`` after ``cudnn_convolution``)."""
    kernels = [("cudnn conv fprop", _tensors((b["input"], b["weight"])), _nbytes(y))]
    if b.get("bias") is not None:
        kernels.append(("conv bias add_", _tensors((y, b["bias"])), _nbytes(y)))
    return kernels


def _convolution_backward(b: dict, out: tuple) -> list[Kernel]:
    """cuDNN's dgrad (dy, w -> dx), wgrad (x, dy -> dw) and the bias gradient (a reduction of
    dy), each where ``output_mask`` asks."""
    dx, dw, db = out
    dy, mask = b["grad_output"], b["output_mask"]
    kernels = []
    if mask[0]:
        kernels.append(("cudnn conv dgrad", _tensors((dy, b["weight"])), _nbytes(dx)))
    if mask[1]:
        kernels.append(("cudnn conv wgrad", _tensors((b["input"], dy)), _nbytes(dw)))
    if mask[2]:
        kernels.append(("conv bias grad (reduce)", _nbytes(dy), _nbytes(db)))
    return kernels


def _batch_norm_forward(b: dict, out: tuple, training: bool) -> list[Kernel]:
    """ATen's CUDA BatchNorm: training is a statistics pass (x -> mean, invstd), the running
    statistics' update, and an apply pass (x, weight, bias, mean, invstd -> y); eval one
    apply pass from the running statistics."""
    x, y = b["input"], out[0]
    per_channel = _tensors((b.get("weight"), b.get("bias")))
    running = _tensors((b.get("running_mean"), b.get("running_var")))
    if not training:
        return [("bn apply (eval)", _nbytes(x) + per_channel + running, _nbytes(y))]
    stats = _tensors(out[1:3])  # save_mean, save_invstd (fp32 [C])
    return [("bn stats", _nbytes(x), stats),
            ("bn running-stats update", stats + running, running),
            ("bn apply", _nbytes(x) + per_channel + stats, _nbytes(y))]


def _batch_norm_backward(b: dict, out: tuple) -> list[Kernel]:
    """ATen's CUDA BatchNorm backward: a reduce pass (dy, x, mean, invstd -> sum dy,
    sum dy*(x-mean), dweight, dbias) and an elementwise pass (dy, x, weight and the sums ->
    dx)."""
    dy, x = b["grad_out"], b["input"]
    stats = _tensors((b.get("save_mean"), b.get("save_invstd", b.get("save_var"))))
    sums = 2 * stats  # sum_dy and sum_dy_xmu, fp32 [C] each
    dx, dw, db = out[:3]
    return [("bn backward reduce", _tensors((dy, x)) + stats, sums + _tensors((dw, db))),
            ("bn backward elemt", _tensors((dy, x, b.get("weight"))) + stats + sums,
             _nbytes(dx))]


def aten_kernels(func: torch._ops.OpOverload, args: tuple, kwargs: dict,
                 out: Any) -> list[Kernel]:
    """The CUDA kernels ATen runs for one operator (what eager's layers run, and torch's
    kernels in fastarch's step): none for views and allocations, eager's per-layer sequences
    for convolution and BatchNorm, one kernel (``_one_kernel``) for the rest."""
    name = func._schema.name.split("::")[-1]
    if func.namespace != "aten" or func.is_view or name in NO_KERNEL:
        return []
    b = _bound(func, args, kwargs)
    if name == "convolution":
        return _convolution(b, out)
    if name == "convolution_backward":
        return _convolution_backward(b, out)
    if name in ("_batch_norm_with_update", "native_batch_norm"):
        return _batch_norm_forward(b, out, training=b.get("training", True))
    if name == "_batch_norm_no_update":
        return _batch_norm_forward(b, out, training=False)
    if name in ("batch_norm_backward", "native_batch_norm_backward"):
        return _batch_norm_backward(b, out)
    return [_one_kernel(func, args, kwargs, out)]


# ----------------------------------------------------------------------------- recording

@dataclass(frozen=True)
class Layers:
    """Where a parameter or buffer lives (leaf path), which block each leaf is in, and which
    leaves are GEMM layers (conv, linear)."""
    owner: dict[int, str]   # storage of a parameter / buffer -> its module's path
    block: dict[str, str]   # leaf path -> block name
    gemms: frozenset[str]   # the conv and linear leaves' paths

    @classmethod
    def of(cls, model: nn.Module, leaves: Sequence[Leaf]) -> "Layers":
        owner = {_storage(t): path for path, module in model.named_modules()
                 for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))}
        gemms = frozenset(leaf.path for leaf in leaves
                          if isinstance(leaf.module, (nn.Conv2d, nn.Linear)))
        return cls(owner, block_names(leaves), gemms)

    def of_tensor(self, t: Any) -> Optional[str]:
        """The leaf path of the parameter or buffer ``t`` is (or views), if any."""
        if not isinstance(t, torch.Tensor):
            return None
        path = self.owner.get(_storage(t))
        return path if path in self.block else None


def _storage(t: torch.Tensor) -> int:
    """The identity of t's storage, which its views share."""
    return t.untyped_storage()._cdata


def block_names(leaves: Sequence[Leaf]) -> dict[str, str]:
    """Each leaf's block: a conv or linear layer and the leaves after it up to the next,
    named by its first and last leaf ("features.0-2", "features.40..avgpool")."""
    groups: list[list[str]] = []
    for leaf in leaves:
        if not groups or isinstance(leaf.module, (nn.Conv2d, nn.Linear)):
            groups.append([])
        groups[-1].append(leaf.path)
    names = {}
    for group in groups:
        first, last = group[0], group[-1]
        parent, _, tail = last.rpartition(".")
        label = first if first == last else (
            f"{first}-{tail}" if first.rpartition(".")[0] == parent else f"{first}..{last}")
        names.update({path: label for path in group})
    return names


class Recorder(TorchDispatchMode):
    """Records the kernels of every operator dispatched while it is active, fastarch's ops
    run through their real implementations on meta tensors (see the module docstring)."""

    def __init__(self, layers: Layers) -> None:
        super().__init__()
        self.layers = layers
        self.rows: list[Row] = []
        self.phase = "forward"
        self.depth = 0
        self.current: Optional[str] = None  # the layer of the operator being recorded
        self.last_layer: Optional[str] = None
        self.pending: list[tuple[str, int, int]] = []  # backward rows awaiting their layer
        self.node_layer: dict[Any, str] = {}  # autograd node -> the layer it computes for

    @contextlib.contextmanager
    def recording(self, phase: str) -> Iterator[None]:
        self.phase = phase
        try:
            yield
        finally:
            self._settle(self.last_layer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0:
            self.current = self._layer_of(args, kwargs)
            if self.current is not None and self.phase == "backward":
                # also where no kernel runs: a gradient accumulated needs no copy, but its
                # parameter closes the layer's backward
                self._settle(self.current)
        self.depth += 1
        try:
            return self._run(func, args, kwargs)
        finally:
            self.depth -= 1

    def _run(self, func, args: tuple, kwargs: dict) -> Any:
        if func.namespace == "fastarch":
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        decomposed = self._decompose(func, args, kwargs)
        if decomposed is not NotImplemented:
            return decomposed
        out = _cuda_layout(func, args, func(*args, **kwargs))
        for kernel in aten_kernels(func, args, kwargs, out):
            self.add(*kernel)
        return out

    def _decompose(self, func, args: tuple, kwargs: dict) -> Any:
        """A composite operator (reshape, contiguous, batch_norm ...) as the operators it is
        made of, each recorded."""
        if not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(),
                                                              "CompositeImplicitAutograd"):
            return NotImplemented
        with self:
            return func.decompose(*args, **kwargs)

    def add_launch(self, launch: Launch) -> None:
        launch.check()
        self.add(launch.name or launch.kernel.__name__, *launch_bytes(launch))

    def add(self, kernel: str, read: int, written: int) -> None:
        if self.phase in ("loss", "optimizer"):
            self.rows.append(Row(kernel, self.phase, self.phase, self.phase, read, written))
        elif self.current is not None:
            self._settle(self.current)
            self.rows.append(Row(kernel, self.current, self.layers.block[self.current],
                                 self.phase, read, written))
        elif self.phase == "backward" or self.last_layer is None:
            self.pending.append((kernel, read, written))
        else:
            block = self.layers.block[self.last_layer]
            self.rows.append(Row(kernel, block, block, self.phase, read, written))

    def _settle(self, layer: Optional[str]) -> None:
        """Give the pending rows ``layer``'s block."""
        block = self.layers.block[layer] if layer is not None else "(input)"
        self.rows.extend(Row(kernel, block, block, self.phase, read, written)
                         for kernel, read, written in self.pending)
        self.pending.clear()
        if layer is not None:
            self.last_layer = layer

    def _layer_of(self, args: tuple, kwargs: dict) -> Optional[str]:
        """The leaf path of the parameters and buffers among the operator's arguments (or
        views of them) — a conv or linear layer's where it takes one (a BatchNorm applied in
        the next conv's prologue is that conv's kernel), else the first's — or of the
        parameter whose gradient the running autograd node accumulates (its copy into the
        parameter's layout); else, in the backward, the layer of an earlier operator of the
        same autograd node (a linear layer's weight gradient after its input gradient)."""
        node = torch._C._current_autograd_node()
        paths = [path for value in (*args, *kwargs.values(), getattr(node, "variable", None))
                 for t in (value if isinstance(value, (list, tuple)) else (value,))
                 if (path := self.layers.of_tensor(t)) is not None]
        if not paths:
            return self.node_layer.get(node)
        path = next((path for path in paths if path in self.layers.gemms), paths[0])
        return path if node is None else self.node_layer.setdefault(node, path)


def _cuda_layout(func: torch._ops.OpOverload, args: tuple, out: Any) -> Any:
    """A convolution's output in the layout cuDNN gives it on a GPU (the memory format of the
    input), where the meta function answers contiguous: later layout-dependent copies (a
    flatten's) then happen as on the GPU. A meta tensor holds no data to carry over."""
    if func is torch.ops.aten.convolution.default and out.dim() == 4:
        channels_last = args[0].is_contiguous(memory_format=torch.channels_last)
        return torch.empty_like(out, memory_format=torch.channels_last if channels_last
                                else torch.contiguous_format)
    return out


class _CudaDropout(TorchFunctionMode):
    """F.dropout as on a GPU: ATen's fused ``native_dropout`` (x in; output and a bool mask
    out), not the bernoulli / div / mul that it decomposes into off CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training, inplace = _dropout_args(*args, **kwargs)
            if training and 0 < p < 1 and not inplace:
                return torch.native_dropout(x, p, True)[0]
        return func(*args, **kwargs)


def _dropout_args(input: torch.Tensor, p: float = 0.5, training: bool = True,
                  inplace: bool = False) -> tuple[torch.Tensor, float, bool, bool]:
    return input, p, training, inplace


@contextlib.contextmanager
def _fastarch_on_meta(recorder: Recorder) -> Iterator[None]:
    """fastarch's functional API taking meta tensors as a GPU's (kernels, not torch's
    fallback; no autocast to look up), every launch recorded instead of run, and outputs
    not NaN-poisoned (a test setting, not a kernel of the model's)."""
    autocast_args = arguments.autocast_args

    def no_autocast_on_meta(x, weight, bias):
        return (x, weight, bias) if x.device.type == "meta" else autocast_args(x, weight, bias)

    runs_triton = backend.runs_triton
    with mock.patch.object(backend, "runs_triton",
                           lambda t: t.device.type == "meta" or runs_triton(t)), \
            mock.patch.object(arguments, "autocast_args", no_autocast_on_meta), \
            mock.patch.object(runtime, "POISON_OUTPUTS", False), \
            mock.patch.object(Launch, "__call__", lambda launch: recorder.add_launch(launch)):
        yield


def record_step(model: nn.Module, x: torch.Tensor, train: bool, layers: Layers) -> list[Row]:
    """The kernels of ``model`` (meta) on ``x``: eval forward without grad, or a training step
    (forward, cross entropy, backward, SGD with momentum 0.9 past its first step: the
    momentum buffers exist)."""
    recorder = Recorder(layers)
    model.train(train)
    if not train:
        with _fastarch_on_meta(recorder), _CudaDropout(), recorder, torch.no_grad(), \
                recorder.recording("forward"):
            model(x)
        return recorder.rows
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with _fastarch_on_meta(recorder), _CudaDropout(), recorder:
        with recorder.recording("forward"):
            logits = model(x)
        with recorder.recording("loss"):
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, target), logits)
        with recorder.recording("backward"):
            logits.backward(grad)
        with recorder.recording("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return recorder.rows


# ----------------------------------------------------------------------------- the ledger

@dataclass(frozen=True)
class Ledger:
    """One model's kernels on both sides: fastarch fused and the eager twin."""
    model: str
    batch: int
    dtype: str
    train: bool
    fastarch: list[Row]
    eager: list[Row]
    blocks: list[str]  # in call order, then loss and optimizer

    @property
    def fastarch_bytes(self) -> int:
        return sum(row.bytes for row in self.fastarch)

    @property
    def eager_bytes(self) -> int:
        return sum(row.bytes for row in self.eager)

    @property
    def ratio(self) -> float:
        return self.fastarch_bytes / self.eager_bytes

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "batch": self.batch, "dtype": self.dtype,
                "train": self.train, "fastarch_bytes": self.fastarch_bytes,
                "eager_bytes": self.eager_bytes, "ratio": self.ratio,
                "blocks": [dict(zip(BLOCK_COLUMNS, cells)) for cells in self.block_table()],
                "fastarch_rows": [asdict(row) for row in self.fastarch],
                "eager_rows": [asdict(row) for row in self.eager]}

    def block_table(self) -> list[tuple]:
        """Per block with any bytes: fastarch's and eager's forward bytes (the loss's and the
        optimizer's in their own blocks' forward column) and backward bytes, and fastarch /
        eager."""
        def total(rows: list[Row], block: str, backward: bool) -> int:
            return sum(r.bytes for r in rows if r.block == block
                       and (r.phase == "backward") == backward)
        table = []
        for block in self.blocks:
            cells = [total(rows, block, backward) for rows in (self.fastarch, self.eager)
                     for backward in (False, True)]
            fastarch, eager = cells[0] + cells[1], cells[2] + cells[3]
            if fastarch or eager:
                table.append((block, *cells, fastarch / eager if eager else math.inf))
        return table


BLOCK_COLUMNS = ("block", "fastarch_forward", "fastarch_backward", "eager_forward",
                 "eager_backward", "ratio")


def build_model(name: str, dtype: torch.dtype) -> nn.Module:
    """``fastarch.models.<name>()`` on the meta device, fused, in ``dtype``, channels_last."""
    with torch.device("meta"):
        model = getattr(models, name)()
    return model.to(dtype=dtype, memory_format=torch.channels_last)


def measure(name: str, batch: int, train: bool, dtype: str = "bf16") -> Ledger:
    """The ledger of model ``name`` (``IMAGES``) at ``batch``: fastarch fused against the
    eager twin, one eval forward or one training step."""
    model = build_model(name, DTYPES[dtype])
    x = torch.empty((batch, *IMAGES[name]), dtype=DTYPES[dtype], device="meta",
                    memory_format=torch.channels_last)
    return measure_module(model, x, train, name, dtype)


def measure_module(model: nn.Module, x: torch.Tensor, train: bool, name: str = "model",
                   dtype: str = "bf16") -> Ledger:
    """The ledger of a meta ``model`` (fastarch modules, fused or not) on a meta ``x``."""
    twin = torch_twin(model)
    leaves = trace_leaves(twin.train(train), x)
    fastarch = record_step(model, x, train, Layers.of(model, leaves))
    eager = record_step(twin, x, train, Layers.of(twin, leaves))
    order = list(dict.fromkeys(block_names(leaves).values()))
    blocks = ["(input)", *order] + (["loss", "optimizer"] if train else [])
    return Ledger(name, x.shape[0], dtype, train, fastarch, eager, blocks)


# ----------------------------------------------------------------------------- the command

def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def markdown(ledger: Ledger, top: int = 10) -> str:
    """The per-block table and the biggest kernels of each side, in markdown (MB = 1e6 B)."""
    mode = "training step" if ledger.train else "eval forward"
    lines = [f"**{ledger.model}**, batch {ledger.batch}, {ledger.dtype}, channels_last, "
             f"{mode}: fastarch {_mb(ledger.fastarch_bytes)} MB, eager "
             f"{_mb(ledger.eager_bytes)} MB, fastarch / eager = {100 * ledger.ratio:.1f} %",
             "",
             "| block | fastarch fwd MB | fastarch bwd MB | eager fwd MB | eager bwd MB | "
             "fastarch / eager |",
             "|---|---:|---:|---:|---:|---:|"]
    for block, *cells, ratio in ledger.block_table():
        lines.append(f"| {block} | " + " | ".join(_mb(c) for c in cells)
                     + f" | {100 * ratio:.0f} % |")
    for side, rows in (("fastarch", ledger.fastarch), ("eager", ledger.eager)):
        lines += ["", f"Biggest {side} kernels:", "",
                  "| kernel | module | phase | read MB | written MB |", "|---|---|---|---:|---:|"]
        for row in sorted(rows, key=lambda r: -r.bytes)[:top]:
            lines.append(f"| {row.kernel} | {row.module} | {row.phase} | {_mb(row.read)} | "
                         f"{_mb(row.written)} |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastarch ledger", description="Bytes every kernel of one forward (or training "
        "step) reads and writes, fastarch fused against PyTorch eager, from shapes alone.")
    parser.add_argument("model", choices=sorted(IMAGES))
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--train", action="store_true",
                        help="one training step: forward, cross entropy, backward, SGD with "
                        "momentum (default: one eval forward)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--json", metavar="PATH", help="write every row and total here")
    parser.add_argument("--top", type=int, default=10, help="biggest kernels shown per side")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    ledger = measure(args.model, args.batch, args.train, args.dtype)
    print(markdown(ledger, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ledger.to_json(), f, indent=1)
    return 0
