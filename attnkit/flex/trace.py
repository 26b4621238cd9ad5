"""A torch score_mod / mask_mod, traced once, written out as Numba source.

The user's function is run once by torch.fx's make_fx on one-element tensors (as torch's flex runs
it under vmap: indexing a captured tensor with b, h, q_idx, kv_idx is advanced indexing), giving a
graph of aten operations on scalars. Every tensor the function reads from outside (a bias table, a
document-id vector, per-head slopes) is a captured tensor: it becomes an argument of the generated
code (`caps[n]`), so new values of the same tensors do not change the source, and the compiled
kernel is reused. The backward is generated too: reverse-mode over the same graph gives
d(score_mod)/d(score), and the scatter-adds into the gradients of captured tensors that require one.
"""

from __future__ import annotations

import math
import types
import weakref
from dataclasses import dataclass, field

import torch

_aten = torch.ops.aten

SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_ARGS = ("b", "h", "q_idx", "kv_idx")


class UntraceableError(ValueError):
    """A score_mod / mask_mod uses something the kernels cannot compile (the message names it)."""


@dataclass
class Traced:
    """A traced function: its Numba source, and the tensors it captured (in `caps` order)."""

    source: str  # the generated functions (score_mod and score_mod_vjp, or mask_mod)
    captures: list  # torch tensors, caps[n]
    grad_captures: list = field(default_factory=list)  # indices into captures whose gradients are computed


def _name(fn):
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _trace(fn, arg_names, what):
    from torch.fx.experimental.proxy_tensor import make_fx

    # Distinct one-element tensors: make_fx would merge arguments that are the same object.
    example = [torch.zeros(1, dtype=torch.int32) for _ in MASK_ARGS]
    if len(arg_names) == 5:
        example = [torch.zeros(1, dtype=torch.float32), *example]
    try:
        graph_module = make_fx(fn)(*example)
    except Exception as error:  # noqa: BLE001: any failure in the user's function is reported as such
        raise UntraceableError(
            f"{what} {_name(fn)!r} could not be traced with one-element tensors as torch's flex_attention "
            f"calls it ({type(error).__name__}: {error}); write it with torch operations on its arguments, "
            "without Python control flow on their values"
        ) from error
    return graph_module


def _kind(node):
    value = node.meta.get("val")
    if value is None:
        return "float"
    if value.dtype == torch.bool:
        return "bool"
    return "float" if value.dtype.is_floating_point else "int"


def _literal(value):
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "np.nan"
        if math.isinf(value):
            return "np.inf" if value > 0 else "-np.inf"
        return repr(value)
    if isinstance(value, int):
        return repr(value)
    raise TypeError(f"unexpected constant {value!r}")


# aten operation -> a function of the argument expressions (already strings) giving the expression.
_BINARY = {"add": "+", "sub": "-", "mul": "*", "floor_divide": "//", "remainder": "%",
           "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_UNARY_MATH = {"exp": "math.exp", "log": "math.log", "tanh": "math.tanh", "sin": "math.sin", "cos": "math.cos",
               "sqrt": "math.sqrt", "log1p": "math.log1p", "expm1": "math.expm1", "floor": "math.floor",
               "ceil": "math.ceil", "trunc": "math.trunc", "abs": "abs", "log2": "math.log2"}
_IDENTITY = {"view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "expand", "clone", "alias", "detach",
             "lift_fresh_copy", "contiguous", "lift_fresh"}
_CONSTANT_LIKE = {"new_ones": 1, "ones_like": 1, "new_zeros": 0, "zeros_like": 0}


class _Writer:
    """Walks a traced graph and writes each node as one Numba statement `vN = expression`."""

    def __init__(self, graph_module, arg_names, fn_name, what):
        self.graph_module = graph_module
        self.arg_names = arg_names
        self.fn_name = fn_name
        self.what = what
        self.names = {}  # fx node -> variable name or capture reference
        self.kinds = {}  # fx node -> "float" / "int" / "bool"
        self.captures = []  # torch tensors in caps order
        self.capture_of = {}  # fx node (get_attr) -> caps index
        self.lines = []  # forward statements
        self.steps = []  # (node, op name, args) for the reverse pass
        self.output = None

    def fail(self, message):
        raise UntraceableError(f"{self.what} {self.fn_name!r}: {message}")

    def expr(self, arg):
        if isinstance(arg, torch.fx.Node):
            if arg in self.capture_of and arg not in self.names:
                self.fail("uses a captured tensor of more than one element as a value; index it with b, h, q_idx "
                          "or kv_idx")
            return self.names[arg]
        if isinstance(arg, (bool, int, float)):
            return _literal(arg)
        self.fail(f"has an argument {arg!r} of type {type(arg).__name__} that the kernels cannot compile")

    def run(self):
        placeholders = 0
        for node in self.graph_module.graph.nodes:
            if node.op == "placeholder":
                self.names[node] = self.arg_names[placeholders]
                self.kinds[node] = "float" if self.arg_names[placeholders] == "score" else "int"
                placeholders += 1
            elif node.op == "get_attr":
                tensor = getattr(self.graph_module, node.target)
                for n, known in enumerate(self.captures):
                    if known is tensor:
                        break
                else:
                    n = len(self.captures)
                    self.captures.append(tensor)
                self.capture_of[node] = n
                if tensor.numel() == 1:  # a captured scalar (a temperature, a constant): usable as a value
                    var = f"v{len(self.lines)}"
                    indices = ["0"] * max(tensor.dim(), 1)  # 0-d captures reach the kernel as shape (1,)
                    self.lines.append(f"{var} = caps[{n}][{', '.join(indices)}]")
                    self.steps.append((node, "index", (n, ["0"] * tensor.dim())))
                    self.names[node] = var
                    self.kinds[node] = "bool" if tensor.dtype == torch.bool else (
                        "float" if tensor.dtype.is_floating_point else "int")
            elif node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                result = node.args[0]
                if isinstance(result, (tuple, list)):
                    if len(result) != 1:
                        self.fail(f"returns {len(result)} values; expected one")
                    result = result[0]
                self.output = result
            else:
                self.fail(f"has a graph node of kind {node.op!r}")
        return self

    def call(self, node):
        target = node.target
        packet = getattr(target, "overloadpacket", None)
        op = getattr(packet, "__name__", str(target))
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            self.fail(f"operation {op} gives a tensor of shape {tuple(value.shape)}; score_mod and mask_mod work "
                      "on one score at a time (torch's flex calls them under vmap)")
        args, kwargs = node.args, node.kwargs
        var = f"v{len(self.lines)}"
        kind = _kind(node)
        if op == "index":
            source, indices = args
            if source not in self.capture_of:
                self.fail("indexes something that is not a captured tensor")
            if any(i is None for i in indices):
                self.fail("indexes a captured tensor with None (a skipped axis); index every axis with a scalar")
            n = self.capture_of[source]
            if len(indices) != self.captures[n].dim():
                self.fail(f"indexes a {self.captures[n].dim()}-D captured tensor with {len(indices)} indices; "
                          "index every axis")
            expression = f"caps[{n}][{', '.join(self.expr(i) for i in indices)}]"
            self.steps.append((node, "index", (n, [self.expr(i) for i in indices])))
        elif op in _BINARY:
            a, b = self.expr(args[0]), self.expr(args[1])
            alpha = kwargs.get("alpha", 1)
            if alpha != 1:
                b = f"({_literal(alpha)} * {b})"
            if kind == "bool" and op in ("add", "mul"):
                self.fail(f"adds or multiplies booleans ({op}); use & and |")
            expression = f"({a} {_BINARY[op]} {b})"
            self.steps.append((node, op, (args[0], args[1], alpha)))
        elif op in ("div", "true_divide"):
            a, b = self.expr(args[0]), self.expr(args[1])
            rounding = kwargs.get("rounding_mode")
            if rounding is None:
                expression = f"({a} / {b})"
                self.steps.append((node, "div", (args[0], args[1])))
            elif rounding == "floor":
                expression = f"({a} // {b})" if kind == "int" else f"math.floor({a} / {b})"
            else:  # trunc
                expression = f"int({a} / {b})" if kind == "int" else f"math.trunc({a} / {b})"
        elif op in ("bitwise_and", "logical_and", "bitwise_or", "logical_or", "bitwise_xor", "logical_xor"):
            a, b = self.expr(args[0]), self.expr(args[1])
            symbol = {"and": "&", "or": "|", "xor": "^"}[op.split("_")[1]]
            if kind == "bool" or op.startswith("logical"):
                expression = f"(bool({a}) {symbol} bool({b}))"
            else:
                expression = f"({a} {symbol} {b})"
        elif op in ("bitwise_not", "logical_not"):
            a = self.expr(args[0])
            expression = f"(not {a})" if kind == "bool" else f"(~{a})"
        elif op == "neg":
            expression = f"(-{self.expr(args[0])})"
            self.steps.append((node, "neg", (args[0],)))
        elif op in _UNARY_MATH:
            expression = f"{_UNARY_MATH[op]}({self.expr(args[0])})"
            if op in ("floor", "ceil", "trunc") and kind == "float":
                expression = f"float({expression})"
            self.steps.append((node, op, (args[0],)))
        elif op == "sigmoid":
            expression = f"(1.0 / (1.0 + math.exp(-{self.expr(args[0])})))"
            self.steps.append((node, op, (args[0],)))
        elif op == "rsqrt":
            expression = f"(1.0 / math.sqrt({self.expr(args[0])}))"
            self.steps.append((node, op, (args[0],)))
        elif op == "exp2":
            expression = f"(2.0 ** {self.expr(args[0])})"
            self.steps.append((node, op, (args[0],)))
        elif op == "sign":
            a = self.expr(args[0])
            expression = f"(({a} > 0) - ({a} < 0))"
        elif op == "pow":
            expression = f"({self.expr(args[0])} ** {self.expr(args[1])})"
            self.steps.append((node, "pow", (args[0], args[1])))
        elif op == "square":
            a = self.expr(args[0])
            expression = f"({a} * {a})"
            self.steps.append((node, "mul", (args[0], args[0], 1)))
        elif op == "where":
            c, a, b = (self.expr(x) for x in args)
            expression = f"({a} if {c} else {b})"
            self.steps.append((node, "where", tuple(args)))
        elif op in ("maximum", "minimum", "fmax", "fmin"):
            a, b = self.expr(args[0]), self.expr(args[1])
            expression = f"{'max' if op in ('maximum', 'fmax') else 'min'}({a}, {b})"
            self.steps.append((node, "pick", (args[0], args[1])))
        elif op in ("clamp", "clamp_min", "clamp_max"):
            a = self.expr(args[0])
            low = args[1] if op in ("clamp", "clamp_min") and len(args) > 1 else kwargs.get("min")
            high = (args[2] if len(args) > 2 else kwargs.get("max")) if op == "clamp" else (
                args[1] if op == "clamp_max" else None)
            expression = a
            if low is not None:
                expression = f"max({expression}, {self.expr(low)})"
            if high is not None:
                expression = f"min({expression}, {self.expr(high)})"
            self.steps.append((node, "clamp", (args[0], low, high)))
        elif op in _IDENTITY:
            expression = self.expr(args[0])
            self.steps.append((node, "same", (args[0],)))
        elif op in ("_to_copy", "to", "type_as", "_conj"):
            a = self.expr(args[0])
            expression = {"float": f"float({a})", "int": f"int({a})", "bool": f"({a} != 0)"}[kind]
            if kind == "float":
                self.steps.append((node, "same", (args[0],)))
        elif op in _CONSTANT_LIKE:
            expression = _literal({"bool": bool, "int": int, "float": float}[kind](_CONSTANT_LIKE[op]))
        elif op in ("full_like", "new_full"):
            expression = _literal({"bool": bool, "int": int, "float": float}[kind](args[1]))
        elif op in ("scalar_tensor", "full"):
            fill = args[0] if op == "scalar_tensor" else args[1]
            expression = _literal({"bool": bool, "int": int, "float": float}[kind](fill))
        else:
            self.fail(f"uses torch operation {op} ({target}), which attnkit's kernels cannot compile yet")
        self.lines.append(f"{var} = {expression}")
        self.names[node] = var
        self.kinds[node] = kind


def _active(writer, grad_captures):
    """Nodes whose value depends on the score or on a captured tensor that requires a gradient."""
    active = set()
    for node, op, args in writer.steps:
        if op == "index":
            if args[0] in grad_captures:
                active.add(node)
            continue
        if any(isinstance(a, torch.fx.Node) and (a in active or writer.names.get(a) == "score") for a in args):
            active.add(node)
    return active


def _reverse_lines(writer, grad_captures):
    """Reverse-mode statements: g_<var> accumulate d(output)/d(var); returns (lines, score's adjoint)."""
    active = _active(writer, grad_captures)
    lines = []
    adjoint = {}  # fx node (or "score") -> adjoint variable name

    def grad_of(node):
        if isinstance(node, torch.fx.Node) and writer.names.get(node) == "score":
            return "g_score"
        if isinstance(node, torch.fx.Node) and node in active:
            return adjoint.setdefault(node, f"g_{writer.names[node]}")
        return None

    def add(target, expression):
        name = grad_of(target)
        if name is not None:
            lines.append(f"{name} += {expression}")

    for node, _, _ in writer.steps:  # in graph order: the same function gives the same source
        if node in active:
            lines.append(f"g_{writer.names[node]} = 0.0")
    output = writer.output
    if output is None or not isinstance(output, torch.fx.Node):
        return lines, "0.0"
    out_grad = grad_of(output)
    if out_grad is not None:
        lines.append(f"{out_grad} += grad")
    for node, op, args in reversed(writer.steps):
        if node not in active:
            continue
        g = f"g_{writer.names[node]}"
        out = writer.names[node]
        e = writer.expr
        if op == "index":
            n, indices = args
            lines.append(f"grad_bufs[{grad_captures.index(n)}][{', '.join(['worker', *indices])}] += {g}")
        elif op == "add":
            add(args[0], g)
            add(args[1], f"{g} * {_literal(args[2])}")
        elif op == "sub":
            add(args[0], g)
            add(args[1], f"-{g} * {_literal(args[2])}")
        elif op == "mul":
            add(args[0], f"{g} * {e(args[1])}")
            add(args[1], f"{g} * {e(args[0])}")
        elif op == "div":
            add(args[0], f"{g} / {e(args[1])}")
            add(args[1], f"-{g} * {out} / {e(args[1])}")
        elif op == "neg":
            add(args[0], f"-{g}")
        elif op == "exp":
            add(args[0], f"{g} * {out}")
        elif op == "exp2":
            add(args[0], f"{g} * {out} * {math.log(2.0)!r}")
        elif op == "log":
            add(args[0], f"{g} / {e(args[0])}")
        elif op == "log2":
            add(args[0], f"{g} / ({e(args[0])} * {math.log(2.0)!r})")
        elif op == "log1p":
            add(args[0], f"{g} / (1.0 + {e(args[0])})")
        elif op == "expm1":
            add(args[0], f"{g} * ({out} + 1.0)")
        elif op == "tanh":
            add(args[0], f"{g} * (1.0 - {out} * {out})")
        elif op == "sigmoid":
            add(args[0], f"{g} * {out} * (1.0 - {out})")
        elif op == "sin":
            add(args[0], f"{g} * math.cos({e(args[0])})")
        elif op == "cos":
            add(args[0], f"-{g} * math.sin({e(args[0])})")
        elif op == "sqrt":
            add(args[0], f"{g} * 0.5 / {out}")
        elif op == "rsqrt":
            add(args[0], f"-{g} * 0.5 * {out} / {e(args[0])}")
        elif op == "abs":
            a = e(args[0])
            add(args[0], f"{g} * (({a} > 0) - ({a} < 0))")
        elif op == "pow":
            a, b = e(args[0]), e(args[1])
            add(args[0], f"{g} * {b} * {a} ** ({b} - 1)")
            add(args[1], f"{g} * {out} * math.log({a})")
        elif op == "where":
            c = e(args[0])
            add(args[1], f"({g} if {c} else 0.0)")
            add(args[2], f"(0.0 if {c} else {g})")
        elif op == "pick":  # max / min: the argument that was chosen
            a = e(args[0])
            add(args[0], f"({g} if {out} == {a} else 0.0)")
            add(args[1], f"(0.0 if {out} == {a} else {g})")
        elif op == "clamp":
            a = e(args[0])
            inside = " and ".join(
                [f"{a} >= {e(args[1])}"] * (args[1] is not None) + [f"{a} <= {e(args[2])}"] * (args[2] is not None)
            ) or "True"
            add(args[0], f"({g} if {inside} else 0.0)")
        elif op == "same":
            add(args[0], g)
        # floor / ceil / trunc / comparisons: zero derivative almost everywhere
    return lines, ("g_score" if any("g_score" in line for line in lines) else "0.0")


def _indent(lines):
    return "".join(f"    {line}\n" for line in lines)


def _fingerprint(fn, keep, depth=0):
    """Identities of everything fn reads from outside: closure cells and the globals its code names,
    through nested functions (and_masks' closures); numbers and strings by value. A new object in
    any of them means a new trace; the same objects (a tensor updated in place included: the kernel
    reads it on every call) do not. keep collects the objects, so that their ids stay theirs."""
    if isinstance(fn, (bool, int, float, str, type(None))):
        return ("value", type(fn).__name__, fn)
    keep.append(fn)
    if depth > 8 or not isinstance(fn, types.FunctionType):
        if isinstance(fn, (tuple, list)):
            return (id(fn), tuple(_fingerprint(x, keep, depth + 1) for x in fn))
        return (id(fn),)
    parts = [id(fn.__code__)]
    for cell in fn.__closure__ or ():
        try:
            parts.append(_fingerprint(cell.cell_contents, keep, depth + 1))
        except ValueError:  # an empty cell
            parts.append(None)
    for name in fn.__code__.co_names:
        if name in fn.__globals__:
            parts.append(_fingerprint(fn.__globals__[name], keep, depth + 1))
    return tuple(parts)


_traces = weakref.WeakKeyDictionary()  # function -> (fingerprint, kind, Traced, kept objects)


def _cached(fn, kind, trace):
    """trace(fn), remembered per function object: tracing costs ~10 ms a call."""
    keep = []
    fingerprint = _fingerprint(fn, keep)
    try:
        known = _traces.get(fn)
    except TypeError:  # not weakly referenceable: trace every time
        return trace(fn)
    if known is not None and known[0] == fingerprint and known[1] == kind:
        return known[2]
    traced = trace(fn)
    _traces[fn] = (fingerprint, kind, traced, keep)
    return traced


def trace_score_mod(score_mod):
    """Traced(score_mod and score_mod_vjp source, captured tensors) for a torch score_mod (cached
    per function while what it reads from outside stays the same objects)."""
    return _cached(score_mod, "score_mod", _trace_score_mod)


def trace_mask_mod(mask_mod):
    """Traced(mask_mod source, captured tensors) for a torch mask_mod (cached as trace_score_mod)."""
    return _cached(mask_mod, "mask_mod", _trace_mask_mod)


def _trace_score_mod(score_mod):
    graph_module = _trace(score_mod, SCORE_ARGS, "score_mod")
    writer = _Writer(graph_module, SCORE_ARGS, _name(score_mod), "score_mod").run()
    grad_captures = [n for n, t in enumerate(writer.captures) if t.requires_grad]
    for n in grad_captures:
        if not writer.captures[n].dtype.is_floating_point:
            writer.fail(f"captured tensor {n} requires grad but is {writer.captures[n].dtype}")
    result = writer.expr(writer.output) if isinstance(writer.output, torch.fx.Node) else _literal(writer.output)
    reverse, score_grad = _reverse_lines(writer, grad_captures)
    if "g_score" not in score_grad:
        score_grad = "0.0"
    head = f"# score_mod {_name(score_mod)!r}, traced by attnkit.flex (torch.fx) and written as Numba source\n"
    source = (
        f"{head}@_jit(inline=\"always\")\n"
        "def score_mod(score, b, h, q_idx, kv_idx, caps):\n"
        f"{_indent(writer.lines)}    return {result}\n\n\n"
        "@_jit(inline=\"always\")\n"
        "def score_mod_vjp(score, b, h, q_idx, kv_idx, caps, grad, grad_bufs, worker):\n"
        "    # the forward again, then d(score_mod)/d(each value) in reverse order\n"
        f"{_indent(writer.lines)}    g_score = 0.0\n{_indent(reverse)}    return {score_grad}\n"
    )
    return Traced(source, writer.captures, grad_captures)


def _trace_mask_mod(mask_mod):
    graph_module = _trace(mask_mod, MASK_ARGS, "mask_mod")
    writer = _Writer(graph_module, MASK_ARGS, _name(mask_mod), "mask_mod").run()
    result = writer.expr(writer.output) if isinstance(writer.output, torch.fx.Node) else _literal(writer.output)
    head = f"# mask_mod {_name(mask_mod)!r}, traced by attnkit.flex (torch.fx) and written as Numba source\n"
    source = (
        f"{head}@_jit(inline=\"always\")\n"
        "def mask_mod(b, h, q_idx, kv_idx, caps):\n"
        f"{_indent(writer.lines)}    return bool({result})\n"
    )
    return Traced(source, writer.captures)


IDENTITY_SCORE_MOD = (
    "@_jit(inline=\"always\")\n"
    "def score_mod(score, b, h, q_idx, kv_idx, caps):\n    return score\n\n\n"
    "@_jit(inline=\"always\")\n"
    "def score_mod_vjp(score, b, h, q_idx, kv_idx, caps, grad, grad_bufs, worker):\n    return grad\n"
)
NO_MASK_MOD = "@_jit(inline=\"always\")\ndef mask_mod(b, h, q_idx, kv_idx, caps):\n    return True\n"
