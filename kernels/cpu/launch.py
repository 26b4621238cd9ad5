"""Kernels that fan work out call their steps (packing, the workers, merges) by address.

Why: Numba links the IR of every njit function a function calls into the
caller's module, then optimises it and emits machine code for it again there.
A parallel (parfor) kernel does so in each gufunc it generates: the cold fp32
forward spent ~10 s of its ~25 s compiling its worker a second and third time
(bench/results/compile-time.md). Here a step is compiled once, on its own (the
same compilation the one-thread paths use when they call it from Python), and
the kernels call it through its address, an integer argument: the kernels'
cached machine code holds no address, so Numba's on-disk cache stays valid.

Safety: an address is only good for the exact argument types it was compiled
for. `address_of` compiles the step for the types `numba.typeof` gives the
values it is shown, and returns a token of those types with the address; a
kernel compares each token with `token_of` the arguments it is about to pass
(a compile-time constant) and returns False instead of calling when one differs.
"""

from __future__ import annotations

import zlib

import numpy as np
from numba import typeof, types
from numba._dispatcher import compute_fingerprint
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["address_of", "call_step", "launch", "steps_array", "token_of"]

def _step_types(arguments, index):
    """The step's argument types: the tuple's, and int64 for an index (None: no index)."""
    return tuple(arguments.types) + (() if isinstance(index, types.NoneType) else (types.int64,))


def _token(argument_types):
    return zlib.crc32(repr(tuple(argument_types)).encode())


@intrinsic
def token_of(typingctx, arguments, index):
    """The token of the types call_step(address, arguments, index) passes: a constant."""
    if not isinstance(arguments, types.BaseTuple):
        return None
    token = _token(_step_types(arguments, index))

    def codegen(context, builder, signature, values):
        return context.get_constant(types.int64, token)

    return types.int64(arguments, index), codegen


@intrinsic
def call_step(typingctx, address, arguments, index):
    """step(*arguments) or step(*arguments, int64(index)) for the step compiled at `address`
    (address_of), which returns nothing; an exception the step raises propagates."""
    if not isinstance(arguments, types.BaseTuple) or not isinstance(address, types.Integer):
        return None
    argument_types = _step_types(arguments, index)

    def codegen(context, builder, signature, values):
        address_value, packed, index_value = values
        items = [builder.extract_value(packed, i) for i in range(len(arguments.types))]
        if not isinstance(index, types.NoneType):
            items.append(context.cast(builder, index_value, index, types.int64))
        function_type = context.call_conv.get_function_type(types.none, argument_types)
        callee = builder.inttoptr(address_value, function_type.as_pointer())
        status, _ = context.call_conv.call_function(builder, callee, types.none, argument_types, items)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return types.none(address, arguments, index), codegen


_ADDRESSES = {}  # (step, Numba's fingerprint of the arguments' types, indexed) -> (address, token)


def address_of(step, arguments, indexed=False, exact=False):
    """(address, token) of the njit function `step` compiled (or loaded from the cache) for the
    types of `arguments`, plus an int64 index when indexed: what call_step calls and token_of checks.

    Found again by the fingerprint Numba's dispatchers key their own type cache with (~1 µs for a
    kernel's arguments; numba.typeof takes ~15 µs per array). The fingerprint leaves out an array's
    alignment: exact=True types every argument (what `launch` does when a kernel refused)."""
    key = None
    if not exact:
        try:
            key = (step, compute_fingerprint(arguments), indexed)
        except (TypeError, ValueError, NotImplementedError):  # a value Numba has no fingerprint for
            pass
    found = _ADDRESSES.get(key) if key is not None else None
    if found is None:
        argument_types = tuple(typeof(value) for value in arguments) + ((types.int64,) if indexed else ())
        step.compile(argument_types)
        result = step.overloads[argument_types]
        if result.signature.return_type != types.none:
            raise TypeError(f"{step.py_func.__qualname__} returns {result.signature.return_type}; a step returns nothing")
        found = (result.library.get_pointer_to_function(result.fndesc.llvm_func_name), _token(argument_types))
        if key is not None:
            _ADDRESSES[key] = found
    return found


def launch(kernel, arguments, find_steps, steps=None):
    """kernel(*arguments, steps), which returns False when its steps were compiled for other types
    than its arguments': steps (when given, e.g. kept by a plan) or find_steps(exact=False) first,
    then find_steps(exact=True). Returns the steps it ran with."""
    for exact in (False, True):
        if steps is None:
            steps = find_steps(exact)
        if kernel(*arguments, steps):
            return steps
        steps = None
    raise RuntimeError(f"attnkit: {kernel.py_func.__name__} refused the steps compiled for its own arguments' types")


def steps_array(*found):
    """The (address, token) pairs of address_of, flat, as the int64 array the kernels take."""
    return np.array([number for pair in found for number in pair], np.int64)
