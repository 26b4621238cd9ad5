"""How the kernels run their steps (packing, the workers, reductions, merges): by address, on
the calling thread or fanned out over Numba's threads by one shared parallel loop.

Why: Numba links the IR of every njit function a function calls into the
caller's module, then optimises it and emits machine code for it again there,
and a parallel (parfor) function does so again in each gufunc it generates: the
cold fp32 forward spent ~10 s of its ~25 s compiling its worker a second and
third time, and the parfor machinery cost seconds per kernel and dtype
(bench/results/compile-time.md). Here a step is compiled once, on its own; a
kernel is a plain njit function that runs a step `count` times with
`run_step`: the step's address and arguments are stored in the kernel's stack
frame with a small trampoline that unpacks them and calls the step (`bundle`),
and `_fan` runs the trampoline in a loop here or through `_fan_out`, the one
parallel function: both compiled once for every kernel, dtype and step. The
addresses are integer arguments, not constants in the machine code, so Numba's
on-disk cache of the kernels stays valid.

Safety: an address is only good for the exact argument types it was compiled
for. `address_of` compiles the step for the types `numba.typeof` gives the
values it is shown, and returns a token of those types with the address; a
kernel compares each token with `token_of` the arguments it is about to pass
(a compile-time constant) and returns REFUSED instead of calling when one
differs; `launch` then finds the steps by the arguments' exact types.
"""

from __future__ import annotations

import zlib

import numpy as np
from llvmlite import ir
from numba import prange, typeof, types
from numba._dispatcher import compute_fingerprint
from numba.core import cgutils
from numba.extending import intrinsic

from ..jit import jit as _jit, jit_inner as _jit_inner, keep_machine_code

__all__ = [
    "FAILED", "RAN", "REFUSED", "KernelCall", "StepFailed", "address_of", "borrowed", "keep_alive", "launch",
    "run_step", "steps_array", "token_of",
]  # fmt: skip


def _step_types(arguments, index):
    """The step's argument types: the tuple's, and int64 for an index (None: no index)."""
    return tuple(arguments.types) + (() if isinstance(index, types.NoneType) else (types.int64,))


def _token(argument_types):
    return zlib.crc32(repr(tuple(argument_types)).encode())


@intrinsic
def token_of(typingctx, arguments, index):
    """The token of the types run_step(address, arguments, index, ...) passes to the step: a constant."""
    if not isinstance(arguments, types.BaseTuple):
        return None
    token = _token(_step_types(arguments, index))

    def codegen(context, builder, signature, values):
        return context.get_constant(types.int64, token)

    return types.int64(arguments, index), codegen


RAN, REFUSED, FAILED = 0, 1, 2  # what a kernel returns


def _record_type(context, arguments):
    """The bundle's memory: (step address, the arguments tuple as Numba stores it)."""
    return ir.LiteralStructType([ir.IntType(64), context.get_value_type(arguments)])


def _trampoline(context, module, arguments, index):
    """int32 trampoline(bundle pointer, index) in `module`: step(*arguments[, index]); 0 when it
    returned, 1 when it raised (the exception itself cannot cross the threads)."""
    argument_types = _step_types(arguments, index)
    record_type = _record_type(context, arguments)
    pointer_type = ir.IntType(8).as_pointer()
    function = ir.Function(module, ir.FunctionType(ir.IntType(32), [pointer_type, ir.IntType(64)]),
                           name=module.get_unique_name("attnkit_step_trampoline"))  # fmt: skip
    function.linkage = "internal"
    builder = ir.IRBuilder(function.append_basic_block("entry"))
    record = builder.bitcast(function.args[0], record_type.as_pointer())
    zero = ir.Constant(ir.IntType(32), 0)
    address = builder.load(builder.gep(record, [zero, zero]))
    packed = builder.load(builder.gep(record, [zero, ir.Constant(ir.IntType(32), 1)]))
    items = [builder.extract_value(packed, i) for i in range(len(arguments.types))]
    if not isinstance(index, types.NoneType):
        items.append(function.args[1])
    step_type = context.call_conv.get_function_type(types.none, argument_types)
    step = builder.inttoptr(address, step_type.as_pointer())
    status, _ = context.call_conv.call_function(builder, step, types.none, argument_types, items)
    builder.ret(builder.select(status.is_ok, zero, ir.Constant(ir.IntType(32), 1)))
    return function


@intrinsic
def bundle(typingctx, address, arguments, index):
    """(trampoline, record) addresses for _fan: step(*arguments) at `address`, with the task's
    index appended when `index` is an integer (None: the step takes no index). The record holds
    the arguments without references of its own: the caller keeps `arguments` alive to its
    _release(bundled, arguments), after the step has run (run_step: an atomic add and an atomic
    subtract per array less, ~30 arrays a forward call, kernel log v54)."""
    if not isinstance(address, types.Integer) or not isinstance(arguments, types.BaseTuple):
        return None
    if not isinstance(index, (types.Integer, types.NoneType)):
        return None

    def codegen(context, builder, signature, values):
        address_value, packed, _ = values
        record = cgutils.alloca_once(builder, _record_type(context, arguments))
        zero = ir.Constant(ir.IntType(32), 0)
        builder.store(context.cast(builder, address_value, address, types.int64), builder.gep(record, [zero, zero]))
        builder.store(packed, builder.gep(record, [zero, ir.Constant(ir.IntType(32), 1)]))
        trampoline = _trampoline(context, builder.module, arguments, index)
        result = types.UniTuple(types.intp, 2)
        return context.make_tuple(builder, result, [builder.ptrtoint(trampoline, ir.IntType(64)),
                                                    builder.ptrtoint(record, ir.IntType(64))])  # fmt: skip

    return types.UniTuple(types.intp, 2)(address, arguments, index), codegen


@intrinsic
def _release(typingctx, bundled, arguments):
    """The end of bundle()'s record: a use of `arguments` that keeps them alive (Numba drops a
    variable's reference after its last use) until every task has run. It emits no code."""

    def codegen(context, builder, signature, values):
        return context.get_dummy_value()

    return types.none(bundled, arguments), codegen


@intrinsic
def _call_trampoline(typingctx, trampoline, record, index):
    """trampoline(record, index) (see _trampoline): 0, or 1 when the step raised."""

    def codegen(context, builder, signature, values):
        pointer_type = ir.IntType(8).as_pointer()
        function_type = ir.FunctionType(ir.IntType(32), [pointer_type, ir.IntType(64)])
        function = builder.inttoptr(values[0], function_type.as_pointer())
        task = context.cast(builder, values[2], index, types.int64)
        return builder.call(function, [builder.inttoptr(values[1], pointer_type), task])

    return types.int32(trampoline, record, index), codegen


@_jit_inner(parallel=True)
def _fan_out(trampoline, record, count):
    """Tasks 0 .. count - 1 over Numba's threads; how many raised."""
    failures = 0
    for task in prange(count):
        failures += _call_trampoline(trampoline, record, task)
    return failures


@_jit_inner()
def _fan(bundled, count, parallel):
    """Run the bundled step for tasks 0 .. count - 1, over Numba's threads when parallel (else
    here: no thread pool starts); True when none raised. One compilation serves every step."""
    trampoline, record = bundled
    failures = 0
    if parallel:
        failures = _fan_out(trampoline, record, count)
    else:
        for task in range(count):
            failures += _call_trampoline(trampoline, record, task)
    return failures == 0


@_jit(inline="always")
def run_step(address, arguments, index, count, parallel):
    """step(*arguments[, task]) for tasks 0 .. count - 1 (index an integer: the task's index is
    appended; None: not), step being the function at `address` (address_of); True when no task
    raised. Inlined into the kernel: nothing compiled per step but the trampoline."""
    bundled = bundle(address, arguments, index)
    ran = _fan(bundled, count, parallel)
    _release(bundled, arguments)
    return ran


_ADDRESSES = {}  # (step, Numba's fingerprint of the arguments' types, indexed) -> (address, token)


def _fingerprint(arguments):
    """The fingerprint Numba's dispatchers key their own type cache with, of the arguments' types (~1 µs
    for a kernel's arguments; numba.typeof takes ~15 µs per array), or None for a value Numba has
    none for. It leaves out an array's alignment."""
    try:
        return compute_fingerprint(arguments)
    except (TypeError, ValueError, NotImplementedError):
        return None


def address_of(step, arguments, indexed=False, exact=False):
    """(address, token) of the njit function `step` compiled (or loaded from the cache) for the
    types of `arguments`, plus an int64 index when indexed: what run_step calls and token_of checks.

    Found again by the arguments' _fingerprint, which leaves out an array's alignment: exact=True
    types every argument (what `launch` does when a kernel refused)."""
    fingerprint = None if exact else _fingerprint(arguments)
    key = None if fingerprint is None else (step, fingerprint, indexed)
    found = _ADDRESSES.get(key) if key is not None else None
    if found is None:
        argument_types = tuple(typeof(value) for value in arguments) + ((types.int64,) if indexed else ())
        step.compile(argument_types)
        result = step.overloads[argument_types]
        if result.signature.return_type != types.none:
            raise TypeError(f"{step.py_func.__qualname__} returns {result.signature.return_type}; a step returns nothing")
        found = (result.library.get_pointer_to_function(result.fndesc.llvm_func_name), _token(argument_types))
        keep_machine_code(step, argument_types, result)  # the cache's copy: machine code, ready to run
        if key is not None:
            _ADDRESSES[key] = found
    return found


def launch(kernel, arguments, find_steps, steps=None, call=None):
    """kernel(*arguments, steps), or call(*arguments, steps) when given (a compiled entry of kernel),
    which returns REFUSED when its steps were compiled for other types than its arguments': steps
    (when given, e.g. kept by a plan) or find_steps(*arguments) first, then
    find_steps(*arguments, exact=True). Returns the steps it ran with."""
    for exact in (False, True):
        if steps is None:
            steps = find_steps(*arguments, exact=exact)
        status = (call or kernel)(*arguments, steps)
        if status == RAN:
            return steps
        if status == FAILED:
            raise _failed(kernel)
        steps = None
    raise RuntimeError(f"attnkit: {_name(kernel)} refused the steps compiled for its own arguments' types")


class KernelCall:
    """A plan's calls of one kernel: launch(), then the kernel's compiled entry for the types the
    first call had.

    Numba's dispatcher types every argument of every call (~0.7 µs of a tiny call's ~10 for a
    kernel's 16 arguments). A plan passes arguments of the same types on every call: its own
    arrays, results allocated as it laid them out, and inputs that _kernel_array made C-contiguous,
    aligned and writeable, of the plan's dtype and number of axes. So after the first call the
    plan calls the compiled function that call ran directly. Only for such callers: given other
    types, the entry would read the arguments as the first call's types.

    any_layout: the positions of array arguments the kernel is compiled for as layout 'A' whatever
    their layout, so that one compiled kernel serves contiguous arrays and strided views alike (an
    array's struct is the same for both; only the code's use of the strides differs). The decode
    kernel reads K and V this way, its workers already did: a second signature of the kernel cost
    ~0.5 s of each decode job's cold compile.
    """

    __slots__ = ("kernel", "find_steps", "steps", "entry", "any_layout")

    def __init__(self, kernel, find_steps, any_layout=()):
        self.kernel, self.find_steps = kernel, find_steps
        self.steps = None  # the last call's steps (find_steps)
        self.entry = None  # the compiled entry of the last call's types; None: not looked up; False: none
        self.any_layout = frozenset(any_layout)

    def __call__(self, *arguments):
        entry = self.entry
        if entry:
            status = entry(*arguments, self.steps)
            if status == RAN:
                return
            if status == FAILED:
                raise _failed(self.kernel)
        typed_call = self._typed_call if self.any_layout else None
        steps = launch(self.kernel, arguments, self.find_steps, self.steps, typed_call)
        if steps is not self.steps:  # a first call, or steps of other types: look again at the next call
            self.entry = None
        elif entry is None:  # a plan's second call (typing the arguments costs ~0.1 ms: not per-call plans)
            overload = self.kernel.overloads.get(self._types(arguments + (steps,)))
            self.entry = False if overload is None else overload.entry_point
        self.steps = steps

    def _types(self, arguments):
        """The arguments' Numba types, those at any_layout as layout 'A'."""
        found = tuple(typeof(value) for value in arguments)
        return tuple(kind.copy(layout="A") if i in self.any_layout else kind for i, kind in enumerate(found))

    def _typed_call(self, *arguments):
        """The kernel compiled (or loaded from the cache) for _types(arguments), called. Found again by
        the arguments' _fingerprint, as address_of finds steps: numba.typeof of a decode's 17
        arguments took ~0.2 ms, which every call of a plan made afresh (a masked decode's) paid. The
        fingerprint leaves out alignment: the plans pass aligned arrays only."""
        fingerprint = _fingerprint(arguments)
        key = None if fingerprint is None else (self.kernel, self.any_layout, fingerprint)
        entry = _TYPED_ENTRIES.get(key) if key is not None else None
        if entry is None:
            entry = self.kernel.compile(self._types(arguments))
            if key is not None:
                _TYPED_ENTRIES[key] = entry
        return entry(*arguments)


_TYPED_ENTRIES = {}  # (kernel, any_layout, Numba's fingerprint of the arguments' types) -> compiled entry


class StepFailed(RuntimeError):
    """A step raised on a worker thread (its exception cannot cross the threads)."""


def _failed(kernel):
    return StepFailed(f"attnkit: a step of {_name(kernel)} raised on a worker thread (out of memory?); "
                      "the call's results are not valid")  # fmt: skip


def _name(kernel):
    return getattr(getattr(kernel, "py_func", kernel), "__name__", repr(kernel))


def steps_array(*found):
    """The (address, token) pairs of address_of, flat, as the int64 array the kernels take."""
    return np.array([number for pair in found for number in pair], np.int64)


@intrinsic
def borrowed(typingctx, array):
    """The array without its MemInfo: the same data, shape and strides, and no reference count to
    update when a view of it is made or it is passed on (an atomic add each, on a counter the
    workers share: 7-11% of an MHA decode's samples in perf). Only for an array some owner keeps
    alive for as long as the result and its views are used: a worker's arguments (the kernel's
    tuple holds them), or a buffer whose variable is used again after the last use of the result.
    A tuple of arrays gives the tuple of their borrowed views."""
    if isinstance(array, types.BaseTuple):
        if not all(isinstance(member, types.Array) for member in array.types):
            return None
    elif not isinstance(array, types.Array):
        return None

    def strip(context, builder, array_type, value):
        view = context.make_array(array_type)(context, builder, value=value)
        view.meminfo = cgutils.get_null_value(view.meminfo.type)
        view.parent = cgutils.get_null_value(view.parent.type)
        return view._getvalue()

    def codegen(context, builder, signature, values):
        if isinstance(array, types.Array):
            return strip(context, builder, array, values[0])
        members = [strip(context, builder, member, builder.extract_value(values[0], i))
                   for i, member in enumerate(array.types)]  # fmt: skip
        return context.make_tuple(builder, array, members)

    return array(array), codegen


@intrinsic
def keep_alive(typingctx, owners):
    """Nothing, at run time; a use of owners here, so that Numba releases them no earlier (the
    buffers whose borrowed() views a loop above used)."""

    def codegen(context, builder, signature, values):
        return context.get_dummy_value()

    return types.none(owners), codegen
