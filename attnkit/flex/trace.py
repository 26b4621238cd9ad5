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
import warnings
import weakref
from dataclasses import dataclass, field

import torch


SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_ARGS = ("b", "h", "q_idx", "kv_idx")


from . import FlexRecompileWarning, UntraceableError  # defined beside the API, which must not import torch


@dataclass
class Traced:
    """A traced function: its Numba source, and the tensors it captured (in `caps` order)."""

    source: str  # the generated functions (score_mod and score_mod_vjp, or mask_mod)
    captures: list  # torch tensors, caps[n]
    grad_captures: list = field(default_factory=list)  # indices into captures whose gradients are computed
    graph: object = None  # the _Graph, for the Triton source (triton_source)


def _name(fn):
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _trace(fn, arg_names, what):
    from torch.fx.experimental.proxy_tensor import make_fx

    # Distinct one-element tensors: make_fx would merge arguments that are the same object. They sit
    # on the captured tensors' device: a CUDA table indexed by CPU indices would not trace.
    device = _capture_device(fn)
    example = [torch.zeros(1, dtype=torch.int32, device=device) for _ in MASK_ARGS]
    if len(arg_names) == 5:
        example = [torch.zeros(1, dtype=torch.float32, device=device), *example]
    if len(arg_names) == 5:  # a fixed arity: make_fx would count parameters with defaults as inputs
        def call(score, b, h, q_idx, kv_idx):
            return fn(score, b, h, q_idx, kv_idx)
    else:
        def call(b, h, q_idx, kv_idx):
            return fn(b, h, q_idx, kv_idx)
    try:
        graph_module = make_fx(call)(*example)
    except Exception as error:  # noqa: BLE001: any failure in the user's function is reported as such
        raise UntraceableError(
            f"{what} {_name(fn)!r} could not be traced with one-element tensors as torch's flex_attention "
            f"calls it ({type(error).__name__}: {error}); write it with torch operations on its arguments, "
            "without Python control flow on their values"
        ) from error
    return graph_module


def _capture_device(fn):
    """The device of the tensors fn reads from outside (closures, globals, defaults, through nested
    functions), the first non-CPU one; the CPU when there is none."""
    reached = []
    _fingerprint(fn, reached)
    for value in reached:
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return value.device
    return torch.device("cpu")


def _kind(node):
    value = node.meta.get("val")
    if value is None:
        return "float"
    if value.dtype == torch.bool:
        return "bool"
    return "float" if value.dtype.is_floating_point else "int"


def _literal(value, inf="np.inf", nan="np.nan"):
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value):
            return nan
        if math.isinf(value):
            return inf if value > 0 else f"-{inf}"
        return repr(value)
    if isinstance(value, int):
        return repr(value)
    raise TypeError(f"unexpected constant {value!r}")


_COMPARISONS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_ARITHMETIC = {"add": "+", "sub": "-", "mul": "*"}
_UNARY = {"exp", "log", "tanh", "sin", "cos", "sqrt", "log1p", "expm1", "floor", "ceil", "trunc", "abs", "log2",
          "sigmoid", "rsqrt", "exp2", "sign", "neg"}
_IDENTITY = {"view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "expand", "clone", "alias", "detach",
             "lift_fresh_copy", "contiguous", "lift_fresh"}
_CONSTANT_LIKE = {"new_ones": 1, "ones_like": 1, "new_zeros": 0, "zeros_like": 0}
_LOGICAL = {"bitwise_and": "&", "logical_and": "&", "bitwise_or": "|", "logical_or": "|", "bitwise_xor": "^",
            "logical_xor": "^"}


@dataclass
class _Step:
    """One operation of a traced function, independent of the language it is written in."""

    node: object  # the fx node
    var: str  # its variable, vN
    op: str  # normalised: index, arith, compare, div, floordiv, mod, truncdiv, logical, not, unary, pow,
    #          where, max, min, clamp, same, cast, const
    args: tuple  # fx nodes or Python numbers (index: (capture n, index args))
    kind: str  # float / int / bool
    extra: object = None  # the operator symbol, the unary function's name, alpha, a constant's value


class _Graph:
    """A traced graph as a list of _Steps, with its captured tensors."""

    def __init__(self, graph_module, arg_names, fn_name, what):
        self.fn_name = fn_name
        self.what = what
        self.arg_names = arg_names
        self.steps = []
        self.var = {}  # fx node -> variable name
        self.kinds = {}
        self.captures = []  # torch tensors in caps order
        self.capture_of = {}  # fx node (get_attr) -> caps index
        self.output = None
        placeholders = 0
        for node in graph_module.graph.nodes:
            if node.op == "placeholder":
                self.var[node] = arg_names[placeholders]
                self.kinds[node] = "float" if arg_names[placeholders] == "score" else "int"
                placeholders += 1
            elif node.op == "get_attr":
                self._capture(node, getattr(graph_module, node.target))
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                result = node.args[0]
                if isinstance(result, (tuple, list)):
                    if len(result) != 1:
                        self.fail(f"returns {len(result)} values; expected one")
                    result = result[0]
                self.output = result
            else:
                self.fail(f"has a graph node of kind {node.op!r}")

    def fail(self, message):
        raise UntraceableError(f"{self.what} {self.fn_name!r}: {message}")

    def _add(self, node, op, args, kind, extra=None):
        for arg in args if op != "index" else args[1]:
            if isinstance(arg, torch.fx.Node) and arg not in self.var:
                if arg in self.capture_of:
                    self.fail("uses a captured tensor of more than one element as a value; index it with b, h, "
                              "q_idx or kv_idx")
                self.fail(f"uses {arg} before it has a value")
            if not isinstance(arg, (torch.fx.Node, bool, int, float, type(None))):
                self.fail(f"has an argument {arg!r} of type {type(arg).__name__} that the kernels cannot compile")
        var = f"v{len(self.steps)}"
        self.steps.append(_Step(node, var, op, tuple(args), kind, extra))
        self.var[node] = var
        self.kinds[node] = kind

    def _capture(self, node, tensor):
        for n, known in enumerate(self.captures):
            if known is tensor:
                break
        else:
            n = len(self.captures)
            self.captures.append(tensor)
        self.capture_of[node] = n
        if tensor.numel() == 1:  # a captured scalar (a temperature, a constant): usable as a value
            kind = "bool" if tensor.dtype == torch.bool else ("float" if tensor.dtype.is_floating_point else "int")
            self._add(node, "index", (n, [0] * tensor.dim()), kind)

    def _call(self, node):
        packet = getattr(node.target, "overloadpacket", None)
        op = getattr(packet, "__name__", str(node.target))
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            self.fail(f"operation {op} gives a tensor of shape {tuple(value.shape)}; score_mod and mask_mod work "
                      "on one score at a time (torch's flex calls them under vmap)")
        args, kwargs, kind = node.args, node.kwargs, _kind(node)
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
            self._add(node, "index", (n, list(indices)), kind)
        elif op in _ARITHMETIC:
            if kind == "bool":
                self.fail(f"adds or multiplies booleans ({op}); use & and |")
            self._add(node, "arith", args[:2], kind, (_ARITHMETIC[op], kwargs.get("alpha", 1)))
        elif op == "rsub":  # a number minus a tensor: rsub(tensor, number, alpha) = number - alpha tensor
            if kind == "bool":
                self.fail("subtracts booleans (rsub); use & and |")
            self._add(node, "arith", (args[1], args[0]), kind, ("-", kwargs.get("alpha", 1)))
        elif op in _COMPARISONS:
            self._add(node, "compare", args[:2], kind, _COMPARISONS[op])
        elif op in ("div", "true_divide"):
            rounding = kwargs.get("rounding_mode")
            self._add(node, {None: "div", "floor": "floordiv", "trunc": "truncdiv"}[rounding], args[:2], kind)
        elif op == "floor_divide":
            self._add(node, "floordiv", args[:2], kind)
        elif op in ("remainder", "fmod"):
            if op == "fmod":
                self.fail("uses torch.fmod; use % (torch.remainder)")
            self._add(node, "mod", args[:2], kind)
        elif op in _LOGICAL:
            self._add(node, "logical", args[:2], kind, (_LOGICAL[op], op.startswith("logical")))
        elif op in ("bitwise_not", "logical_not"):
            self._add(node, "not", args[:1], kind, op.startswith("logical"))
        elif op in _UNARY:
            self._add(node, "unary", args[:1], kind, op)
        elif op == "pow":
            self._add(node, "pow", args[:2], kind)
        elif op == "square":
            self._add(node, "pow", (args[0], 2), kind)
        elif op == "where":
            self._add(node, "where", args[:3], kind)
        elif op in ("maximum", "minimum", "fmax", "fmin"):
            self._add(node, "max" if op in ("maximum", "fmax") else "min", args[:2], kind)
        elif op in ("clamp", "clamp_min", "clamp_max"):
            low = args[1] if op in ("clamp", "clamp_min") and len(args) > 1 else kwargs.get("min")
            high = (args[2] if len(args) > 2 else kwargs.get("max")) if op == "clamp" else (
                args[1] if op == "clamp_max" else None)
            self._add(node, "clamp", (args[0], low, high), kind)
        elif op in _IDENTITY:
            self._add(node, "same", args[:1], kind)
        elif op in ("_to_copy", "to", "type_as"):
            self._add(node, "cast", args[:1], kind)
        elif op in _CONSTANT_LIKE:
            self._add(node, "const", (), kind, _CONSTANT_LIKE[op])
        elif op in ("full_like", "new_full"):
            self._add(node, "const", (), kind, args[1])
        elif op in ("scalar_tensor", "full"):
            self._add(node, "const", (), kind, args[0] if op == "scalar_tensor" else args[1])
        else:
            self.fail(f"uses torch operation {op} ({node.target}), which attnkit's kernels cannot compile yet")


class _Numba:
    """Statements for Numba: scalar Python on one score."""

    name = "numba"

    def __init__(self, graph):
        self.graph = graph

    def e(self, arg):
        if isinstance(arg, torch.fx.Node):
            return self.graph.var[arg]
        return _literal(arg)

    def load(self, n, indices, kind):
        # The arguments themselves are never negative: indexed unsigned, they skip Numba's wraparound
        # test, and a row's loads (docs[kv_idx] along the keys) vectorise.
        indices = [f"np.uint64({i})" if i in MASK_ARGS else i for i in indices]
        return f"caps[{n}][{', '.join(indices) or '0'}]"  # a 0-d capture reaches the kernel as shape (1,)

    def accumulate(self, slot, indices, g):
        return f"grad_bufs[{slot}][{', '.join(['worker', *indices])}] += {g}"

    def unary(self, name, a):
        table = {"exp": f"math.exp({a})", "log": f"math.log({a})", "tanh": f"math.tanh({a})",
                 "sin": f"math.sin({a})", "cos": f"math.cos({a})", "sqrt": f"math.sqrt({a})",
                 "log1p": f"math.log1p({a})", "expm1": f"math.expm1({a})", "floor": f"math.floor({a})",
                 "ceil": f"math.ceil({a})", "trunc": f"math.trunc({a})", "abs": f"abs({a})",
                 "log2": f"math.log2({a})", "sigmoid": f"(1.0 / (1.0 + math.exp(-{a})))",
                 "rsqrt": f"(1.0 / math.sqrt({a}))", "exp2": f"(2.0 ** {a})", "sign": f"(({a} > 0) - ({a} < 0))",
                 "neg": f"(-{a})"}
        return table[name]

    def select(self, condition, a, b):
        return f"({a} if {condition} else {b})"

    def pick(self, which, a, b):
        return f"{which}({a}, {b})"

    # Integers divided by zero raise, as in torch (kernels/cpu/flex.py's _int_divisor); floats give
    # inf or nan, as in torch: the kernels divide as NumPy does (kernels/jit.py).
    def floordiv(self, a, b, kind):
        return f"({a} // _int_divisor({b}))" if kind == "int" else f"math.floor({a} / {b})"

    def mod(self, a, b, kind):
        return f"({a} % _int_divisor({b}))" if kind == "int" else f"({a} % {b})"

    def truncdiv(self, a, b, kind):
        return f"int({a} / _int_divisor({b}))" if kind == "int" else f"math.trunc({a} / {b})"

    def logical(self, symbol, a, b, kind, logical):
        return f"(bool({a}) {symbol} bool({b}))" if kind == "bool" or logical else f"({a} {symbol} {b})"

    def negate(self, a, kind, logical):
        return f"(not {a})" if kind == "bool" or logical else f"(~{a})"

    def cast(self, a, kind):
        return {"float": f"float({a})", "int": f"int({a})", "bool": f"({a} != 0)"}[kind]

    def power(self, a, b):
        return f"({a} ** {b})"


class _Triton(_Numba):
    """Statements for Triton: the same operations on a (BLOCK_M, BLOCK_N) tile of scores."""

    name = "triton"

    def e(self, arg):
        if isinstance(arg, torch.fx.Node):
            return self.graph.var[arg]
        return _literal(arg, inf="_INF", nan="_NAN")

    def __init__(self, graph, prefix, grad_captures=()):
        super().__init__(graph)
        self.prefix = prefix  # C: score_mod's captures, M: mask_mod's
        self.grad_captures = list(grad_captures)

    def _offset(self, n, indices):
        return " + ".join(f"({i}) * {self.prefix}{n}_s{axis}" for axis, i in enumerate(indices)) or "0"

    def load(self, n, indices, kind):
        value = f"tl.load({self.prefix}{n} + {self._offset(n, indices)} + zero_index, mask=valid, other=0)"
        return f"({value} != 0)" if kind == "bool" else value  # booleans reach the kernel as int8

    def accumulate(self, slot, indices, g):
        n = self.grad_captures[slot]  # the gradient has its capture's (contiguous) layout
        return (f"if ACCUMULATE:\n    tl.atomic_add(G{slot} + {self._offset(n, indices)} + zero_index, {g}, "
                f"mask=valid & (grad != 0) & ({g} != 0))")  # grad 0: 0 * an infinite derivative is no NaN here

    def unary(self, name, a):
        table = {"exp": f"tl.exp({a})", "log": f"tl.log({a})", "tanh": f"_tanh({a})", "sin": f"tl.sin({a})",
                 "cos": f"tl.cos({a})", "sqrt": f"tl.sqrt({a})", "log1p": f"tl.log(1.0 + {a})",
                 "expm1": f"(tl.exp({a}) - 1.0)", "floor": f"tl.floor({a})", "ceil": f"tl.ceil({a})",
                 "trunc": f"_trunc({a})", "abs": f"tl.abs({a})", "log2": f"tl.log2({a})",
                 "sigmoid": f"(1.0 / (1.0 + tl.exp(-{a})))", "rsqrt": f"(1.0 / tl.sqrt({a}))",
                 "exp2": f"tl.exp2({a})", "sign": f"(({a} > 0).to(tl.float32) - ({a} < 0).to(tl.float32))",
                 "neg": f"(-{a})"}
        return table[name]

    def select(self, condition, a, b):
        return f"tl.where({condition}, {a}, {b})"

    def pick(self, which, a, b):
        return f"tl.{'maximum' if which == 'max' else 'minimum'}({a}, {b})"

    def floordiv(self, a, b, kind):
        return f"_floordiv({a}, {b})" if kind == "int" else f"tl.floor({a} / {b})"

    def mod(self, a, b, kind):
        return f"_mod({a}, {b})"

    def truncdiv(self, a, b, kind):
        return f"({a} // {b})" if kind == "int" else f"_trunc({a} / {b})"  # Triton's // truncates, as C

    def logical(self, symbol, a, b, kind, logical):
        return f"(({a} != 0) {symbol} ({b} != 0))" if kind == "bool" or logical else f"({a} {symbol} {b})"

    def negate(self, a, kind, logical):
        return f"({a} == 0)" if kind == "bool" or logical else f"(~{a})"

    def cast(self, a, kind):
        return {"float": f"(({a}) + 0.0)", "int": f"(({a}) + 0)", "bool": f"({a} != 0)"}[kind]

    def power(self, a, b):
        if isinstance(b, str) and b.isdigit() and int(b) <= 4:
            return "(" + " * ".join([a] * int(b)) + ")" if int(b) else "1.0"
        return f"tl.exp({b} * tl.log({a}))"


def _forward_lines(graph, dialect):
    lines = []
    e = dialect.e
    for step in graph.steps:
        op, args = step.op, step.args
        if op == "index":
            expression = dialect.load(args[0], [e(i) for i in args[1]], step.kind)
        elif op == "arith":
            symbol, alpha = step.extra
            b = e(args[1]) if alpha == 1 else f"({_literal(alpha)} * {e(args[1])})"
            expression = f"({e(args[0])} {symbol} {b})"
        elif op == "compare":
            expression = f"({e(args[0])} {step.extra} {e(args[1])})"
        elif op == "div":
            expression = f"({e(args[0])} / {e(args[1])})"
        elif op == "floordiv":
            expression = dialect.floordiv(e(args[0]), e(args[1]), step.kind)
        elif op == "truncdiv":
            expression = dialect.truncdiv(e(args[0]), e(args[1]), step.kind)
        elif op == "mod":
            expression = dialect.mod(e(args[0]), e(args[1]), step.kind)
        elif op == "logical":
            expression = dialect.logical(step.extra[0], e(args[0]), e(args[1]), step.kind, step.extra[1])
        elif op == "not":
            expression = dialect.negate(e(args[0]), step.kind, step.extra)
        elif op == "unary":
            expression = dialect.unary(step.extra, e(args[0]))
            if step.extra in ("floor", "ceil", "trunc") and step.kind == "float" and dialect.name == "numba":
                expression = f"float({expression})"
        elif op == "pow":
            expression = dialect.power(e(args[0]), e(args[1]))
        elif op == "where":
            expression = dialect.select(e(args[0]), e(args[1]), e(args[2]))
        elif op in ("max", "min"):
            expression = dialect.pick(op, e(args[0]), e(args[1]))
        elif op == "clamp":
            expression = e(args[0])
            if args[1] is not None:
                expression = dialect.pick("max", expression, e(args[1]))
            if args[2] is not None:
                expression = dialect.pick("min", expression, e(args[2]))
        elif op == "same":
            expression = e(args[0])
        elif op == "cast":
            expression = dialect.cast(e(args[0]), step.kind)
        else:  # const
            expression = dialect.e({"bool": bool, "int": int, "float": float}[step.kind](step.extra))
        lines.append(f"{step.var} = {expression}")
    return lines


_DIFFERENTIABLE = {"index", "arith", "div", "unary", "pow", "where", "max", "min", "clamp", "same", "cast"}


def _active(graph, grad_captures):
    """Steps whose value depends on the score or on a captured tensor that requires a gradient."""
    active = set()
    for step in graph.steps:
        if step.op not in _DIFFERENTIABLE or step.kind != "float":
            continue
        if step.op == "index":
            if step.args[0] in grad_captures:
                active.add(step.node)
        elif any(isinstance(a, torch.fx.Node) and (a in active or graph.var.get(a) == "score") for a in step.args):
            active.add(step.node)
    return active


def _reverse_lines(graph, dialect, grad_captures):
    """Reverse-mode statements: g_<var> accumulates d(output)/d(var). Returns (lines, score's adjoint)."""
    active = _active(graph, grad_captures)
    e = dialect.e
    lines = [f"g_{step.var} = 0.0" for step in graph.steps if step.node in active]

    def add(target, expression):
        if isinstance(target, torch.fx.Node) and graph.var.get(target) == "score":
            lines.append(f"g_score += {expression}")
        elif isinstance(target, torch.fx.Node) and target in active:
            lines.append(f"g_{graph.var[target]} += {expression}")

    output = graph.output
    if isinstance(output, torch.fx.Node):
        add(output, "grad")
    for step in reversed(graph.steps):
        if step.node not in active:
            continue
        g, out, args = f"g_{step.var}", step.var, step.args
        op = step.extra if step.op == "unary" else step.op
        if op == "index":
            lines.append(dialect.accumulate(grad_captures.index(args[0]), [e(i) for i in args[1]], g))
        elif op == "arith":
            symbol, alpha = step.extra
            if symbol == "*":
                add(args[0], f"{g} * {e(args[1])}")
                add(args[1], f"{g} * {e(args[0])}")
            else:
                add(args[0], g)
                add(args[1], f"{'-' if symbol == '-' else ''}{g} * {_literal(alpha)}")
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
            add(args[0], f"{g} * {dialect.unary('cos', e(args[0]))}")
        elif op == "cos":
            add(args[0], f"-{g} * {dialect.unary('sin', e(args[0]))}")
        elif op == "sqrt":
            add(args[0], f"{g} * 0.5 / {out}")
        elif op == "rsqrt":
            add(args[0], f"-{g} * 0.5 * {out} / {e(args[0])}")
        elif op == "abs":
            add(args[0], f"{g} * {dialect.unary('sign', e(args[0]))}")
        elif op == "pow":
            a, b = e(args[0]), e(args[1])
            exponent = f"({b} - 1)" if not isinstance(args[1], (int, float)) else _literal(args[1] - 1)
            add(args[0], f"{g} * {b} * {dialect.power(a, exponent)}")
            add(args[1], f"{g} * {out} * {dialect.unary('log', a)}")
        elif op == "where":
            c = e(args[0])
            add(args[1], dialect.select(c, g, "0.0"))
            add(args[2], dialect.select(c, "0.0", g))
        elif op in ("max", "min"):  # the argument that was chosen
            chosen = f"{out} == {e(args[0])}"
            add(args[0], dialect.select(chosen, g, "0.0"))
            add(args[1], dialect.select(chosen, "0.0", g))
        elif op == "clamp":
            a = e(args[0])
            inside = [f"({a} >= {e(args[1])})"] * (args[1] is not None) + [f"({a} <= {e(args[2])})"] * (
                args[2] is not None)
            add(args[0], dialect.select(" & ".join(inside), g, "0.0") if inside else g)
        elif op in ("same", "cast"):
            add(args[0], g)
        # floor / ceil / trunc / sign: zero derivative almost everywhere
    return lines, ("g_score" if any(line.startswith("g_score +=") for line in lines) else "0.0")


def _indent(lines):
    return "".join(f"    {part}\n" for line in lines for part in line.split("\n"))


def _result(graph, dialect):
    return dialect.e(graph.output)


def _numba_score_source(graph, fn_name, grad_captures):
    dialect = _Numba(graph)
    forward = _forward_lines(graph, dialect)
    reverse, score_grad = _reverse_lines(graph, dialect, grad_captures)
    return (
        f"# score_mod {fn_name!r}, traced by attnkit.flex (torch.fx) and written as Numba source\n"
        "@_jit(inline=\"always\")\n"
        "def score_mod(score, b, h, q_idx, kv_idx, caps):\n"
        f"{_indent(forward)}    return {_result(graph, dialect)}\n\n\n"
        "@_jit(inline=\"always\")\n"
        "def score_mod_vjp(score, b, h, q_idx, kv_idx, caps, grad, grad_bufs, worker):\n"
        "    # the forward again, then d(score_mod)/d(each value) in reverse order\n"
        f"{_indent(forward)}    g_score = 0.0\n{_indent(reverse)}    return {score_grad}\n"
    )


def _numba_mask_source(graph, fn_name):
    dialect = _Numba(graph)
    return (
        f"# mask_mod {fn_name!r}, traced by attnkit.flex (torch.fx) and written as Numba source\n"
        "@_jit(inline=\"always\")\n"
        "def mask_mod(b, h, q_idx, kv_idx, caps):\n"
        f"{_indent(_forward_lines(graph, dialect))}    return bool({_result(graph, dialect)})\n"
    )


TRITON_SLOTS, TRITON_AXES = 4, 4  # captured tensors a Triton score_mod / mask_mod may read, and their axes


def _slots(prefix):
    return ", ".join(f"{prefix}{n}, " + ", ".join(f"{prefix}{n}_s{a}" for a in range(TRITON_AXES))
                     for n in range(TRITON_SLOTS))


def triton_score_source(traced):
    """score_mod and score_mod_vjp as Triton functions of a tile (None traced: the identity)."""
    slots = _slots("C")
    grads = ", ".join(f"G{n}" for n in range(TRITON_SLOTS))
    head = (f"@triton.jit\ndef score_mod(score, b, h, q_idx, kv_idx, valid, zero_index, {slots}):\n")
    vjp_head = (f"@triton.jit\ndef score_mod_vjp(score, b, h, q_idx, kv_idx, valid, zero_index, {slots}, grad, "
                f"{grads}, ACCUMULATE: tl.constexpr):\n")
    if traced is None:
        return f"{head}    return score\n\n\n{vjp_head}    return grad\n"
    graph = traced.graph
    _check_slots(graph, traced.captures)
    dialect = _Triton(graph, "C", traced.grad_captures)
    forward = _forward_lines(graph, dialect)
    reverse, score_grad = _reverse_lines(graph, dialect, traced.grad_captures)
    return (
        f"{head}{_indent(forward)}    return ({_result(graph, dialect)}) + zero_index * 0.0\n\n\n"
        f"{vjp_head}{_indent(forward)}    g_score = 0.0\n{_indent(reverse)}"
        f"    return ({score_grad}) + zero_index * 0.0\n"
    )


def triton_mask_source(traced):
    """mask_mod as a Triton function of a tile (None traced: every score visible)."""
    head = f"@triton.jit\ndef mask_mod(b, h, q_idx, kv_idx, valid, zero_index, {_slots('M')}):\n"
    if traced is None:
        return f"{head}    return zero_index == 0\n"
    graph = traced.graph
    _check_slots(graph, traced.captures)
    dialect = _Triton(graph, "M")
    return f"{head}{_indent(_forward_lines(graph, dialect))}    return (({_result(graph, dialect)}) != 0) | (zero_index != 0)\n"


def _check_slots(graph, captures):
    if len(captures) > TRITON_SLOTS:
        graph.fail(f"captures {len(captures)} tensors; the Triton kernel takes at most {TRITON_SLOTS}")
    for tensor in captures:
        if tensor.dim() > TRITON_AXES:
            graph.fail(f"captures a {tensor.dim()}-D tensor; the Triton kernel reads at most {TRITON_AXES} axes")


def _read_from_outside(fn):
    """(name, value) of what function fn reads from outside: its closure cells (empty ones
    skipped) and the globals its code names."""
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        yield name, value
    for name in fn.__code__.co_names:
        if name in fn.__globals__:
            yield name, fn.__globals__[name]


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
    parts += [_fingerprint(value, keep, depth + 1) for _, value in _read_from_outside(fn)]
    for value in (fn.__defaults__ or ()) + tuple((fn.__kwdefaults__ or {}).values()):
        parts.append(_fingerprint(value, keep, depth + 1))
    return tuple(parts)


_traces = weakref.WeakKeyDictionary()  # function -> (fingerprint, kind, Traced, kept objects)
_sources_of_code = {}  # (file, line, name, kind) -> {source: the Python numbers it read}
_told_recompiles = set()


def _numbers_read(fn):
    """{name: value} of the Python numbers (not bools) fn reads from its closure and its globals."""
    return {name: value for name, value in _read_from_outside(fn)
            if isinstance(value, (int, float)) and not isinstance(value, bool)}  # fmt: skip


def _caller_stacklevel():
    """warnings.warn's stacklevel of the first frame outside attnkit and torch (the user's call:
    flex_attention runs behind torch's dynamo-disable wrapper)."""
    import os
    import sys

    packages = tuple(os.path.dirname(os.path.abspath(p)) for p in (os.path.dirname(__file__), torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(packages):
        frame, level = frame.f_back, level + 1
    return level


def _note_new_source(fn, kind, traced):
    """Warn, once per function, when its code traces to a new source because Python numbers it
    reads changed: the new source is a new kernel to compile (seconds), for every new value."""
    if not isinstance(fn, types.FunctionType):
        return
    code = fn.__code__
    key = (code.co_filename, code.co_firstlineno, code.co_name, kind)
    known = _sources_of_code.setdefault(key, {})
    numbers = _numbers_read(fn)
    if traced.source in known or not known:
        known.setdefault(traced.source, numbers)
        return
    previous = next(reversed(known.values()))
    known[traced.source] = numbers
    changed = {name: (previous[name], value) for name, value in numbers.items()
               if name in previous and previous[name] != value}  # fmt: skip
    if not changed or key in _told_recompiles:
        return
    _told_recompiles.add(key)
    names = ", ".join(f"{name} = {new!r} (was {old!r})" for name, (old, new) in changed.items())
    warnings.warn(
        f"attnkit: {kind} {_name(fn)!r} reads the Python numbers {names}, which are constants of the "
        f"code it compiles to: each new value compiles a new kernel (seconds, and memory kept for the "
        f"process). Capture a value that changes as a 0-d tensor (torch.tensor(...)), whose value the "
        f"kernel reads when it runs. (This warning is given once per function.)",
        FlexRecompileWarning, stacklevel=_caller_stacklevel(),
    )


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
    _note_new_source(fn, kind, traced)
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
    graph = _Graph(_trace(score_mod, SCORE_ARGS, "score_mod"), SCORE_ARGS, _name(score_mod), "score_mod")
    grad_captures = [n for n, t in enumerate(graph.captures) if t.requires_grad]
    for n in grad_captures:
        if not graph.captures[n].dtype.is_floating_point:
            graph.fail(f"captured tensor {n} requires grad but is {graph.captures[n].dtype}")
    return Traced(_numba_score_source(graph, _name(score_mod), grad_captures), graph.captures, grad_captures, graph)


def _trace_mask_mod(mask_mod):
    graph = _Graph(_trace(mask_mod, MASK_ARGS, "mask_mod"), MASK_ARGS, _name(mask_mod), "mask_mod")
    return Traced(_numba_mask_source(graph, _name(mask_mod)), graph.captures, [], graph)
