"""Kernels call their steps by address (kernels/cpu/launch.py): a kernel handed steps compiled for
other argument types refuses them before calling anything, and the call then finds the steps by
the arguments' exact types; unaligned inputs are copied, not compiled for; a borrowed() view shares
the data without reference counts; a function only compiled code calls (jit_inner) has no Python
wrapper, and a Python call of it raises TypeError."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba.core.unsafe.refcount import get_refcount

from attnkit.kernels import numba_attention as kernel
from attnkit.kernels.jit import jit_inner
from attnkit.kernels.cpu.launch import address_of, borrowed, keep_alive, run_step, steps_array, token_of
from attnkit.kernels.cpu.plan import _kernel_array
from attnkit.reference import attention, attention_backward
from attnkit.testing import assert_within_rule


def _wrong(steps):
    """steps whose tokens match nothing, at address 0: calling one would crash the process."""
    wrong = steps.copy()
    wrong[0::2] = 0
    wrong[1::2] += 1
    return wrong


@pytest.fixture
def steps_wrong_at_first(monkeypatch):
    """Each kernel's steps are first found wrong (fingerprint lookup), right by exact types; returns
    the calls seen: [(kernel, exact), ...]."""
    seen = []
    for name in ("forward_steps", "backward_steps", "decode_steps"):
        find = getattr(kernel, name)

        def wrong_first(*arguments, exact=False, find=find, name=name):
            seen.append((name, exact))
            steps = find(*arguments, exact=exact)
            return steps if exact else _wrong(steps)

        monkeypatch.setattr(kernel, name, wrong_first)
    return seen


def _inputs(q_shape, kv_shape, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(q_shape).astype(np.float32)
    k, v = (rng.standard_normal(kv_shape).astype(np.float32) for _ in range(2))
    return q, k, v, rng


def _check(name, actual, q, k, v, mask, d_out=None, grads=None):
    """The kernel's out (and gradients) against the reference by the 2x / 3x rule."""
    options = dict(mask=mask, scale=0.25)
    exact = attention(*(x.astype(np.float64) for x in (q, k, v)), return_lse=True, **options)
    plain = attention(q, k, v, return_lse=True, **options)
    assert_within_rule(f"{name} out", actual, exact[0], plain[0], 2)
    if grads is not None:
        exact_grads = attention_backward(*(x.astype(np.float64) for x in (q, k, v)), exact[0], d_out, exact[1],
                                         **options)  # fmt: skip
        plain_grads = attention_backward(q, k, v, plain[0], d_out.astype(np.float32), plain[1], **options)
        for part, got, want, budget in zip(("dq", "dk", "dv"), grads, exact_grads, plain_grads):
            assert_within_rule(f"{name} {part}", got, want, budget, 3)


@pytest.mark.parametrize("workers", ["serial", "parallel"])
def test_a_kernel_refuses_steps_of_other_types_and_the_call_retries_by_exact_types(
    workers, steps_wrong_at_first, monkeypatch,
):  # fmt: skip
    if workers == "serial":
        monkeypatch.setattr(kernel, "worker_count", lambda: 1)
    q, k, v, rng = _inputs((1, 4, 96, 32), (1, 2, 96, 32), seed=11)
    mask = rng.random((1, 1, 96, 96)) < 0.8  # a masked call plans afresh: no steps kept from another call
    options = dict(scale=0.25, causal=None, window=None, softcap=None)
    out, lse = kernel.flash_forward(q, k, v, mask, **options)
    d_out = rng.standard_normal(out.shape).astype(np.float32)
    grads = kernel.flash_backward(q, k, v, mask, out, d_out, lse, **options)
    _check(workers, out, q, k, v, mask, d_out, grads)
    for name in ("forward_steps", "backward_steps"):
        assert [exact for seen, exact in steps_wrong_at_first if seen == name] == [False, True]


def test_the_decode_kernel_refuses_steps_of_other_types(steps_wrong_at_first, monkeypatch):
    monkeypatch.setattr(kernel, "worker_count", lambda: 2)
    q, k, v, rng = _inputs((2, 8, 1, 64), (2, 2, 1500, 64), seed=12)  # keys split across workers, then merged
    mask = rng.random((2, 1, 1, 1500)) < 0.9
    out, _ = kernel.flash_forward(q, k, v, mask, scale=0.25, causal=None, window=None, softcap=None)
    _check("decode", out, q, k, v, mask)
    assert [exact for name, exact in steps_wrong_at_first if name == "decode_steps"] == [False, True]


def test_unaligned_inputs_are_copied_into_aligned_ones():
    q, k, v, _ = _inputs((1, 2, 9, 16), (1, 2, 9, 16), seed=13)
    raw = np.zeros(q.nbytes + 1, np.uint8)
    unaligned = raw[1:].view(np.float32).reshape(q.shape)
    unaligned[...] = q
    assert not unaligned.flags.aligned and unaligned.flags.c_contiguous
    assert _kernel_array(unaligned, np.float32).flags.aligned
    out, _ = kernel.flash_forward(unaligned, k, v, None, scale=0.25, causal=None, window=None, softcap=None)
    _check("unaligned", out, q, k, v, None)


@numba.njit
def _write_index(out, task):
    """A step: out[task] = task + 1; task 2 of an array longer than 5 raises instead."""
    if out.shape[0] > 5 and task == 2:
        raise ValueError("task 2 fails")
    out[task] = task + 1


@numba.njit
def _run_write_index(steps, out, parallel):
    if steps[1] != token_of((out,), 0):
        return -1
    return 1 if run_step(steps[0], (out,), 0, out.shape[0], parallel) else 0


@pytest.mark.parametrize("parallel", [False, True], ids=["here", "threads"])
def test_run_step_passes_each_task_its_index_and_reports_a_step_that_raised(parallel):
    out = np.zeros(5, np.int64)
    steps = steps_array(address_of(_write_index, (out,), indexed=True))
    assert _run_write_index(steps, out, parallel) == 1
    np.testing.assert_array_equal(out, np.arange(1, 6))
    failing = np.zeros(6, np.int64)  # longer than 5: task 2 raises; the others still ran
    assert _run_write_index(steps_array(address_of(_write_index, (failing,), indexed=True)), failing, parallel) == 0
    np.testing.assert_array_equal(failing, [1, 2, 0, 4, 5, 6])
    readonly = np.zeros(5, np.int64)
    readonly.flags.writeable = False  # another type: the token differs, nothing runs
    assert _run_write_index(steps, readonly, parallel) == -1


@numba.njit
def _view_of(n, borrow):
    """(owner's reference count before, while a view of it lives, the view's sum, owner[2]) with the
    view taken from borrowed(owner) or from owner itself."""
    owner = np.zeros(n)
    before = get_refcount(owner)
    source = borrowed(owner) if borrow else owner
    view = source[2:]
    view[0] = 5.0
    during = get_refcount(owner)
    total = view.sum()
    keep_alive(owner)
    return before, during, total, owner[2]


@pytest.mark.parametrize("borrow", [True, False], ids=["borrowed", "owned"])
def test_a_borrowed_view_shares_the_data_and_leaves_the_reference_count_alone(borrow):
    before, during, total, written = _view_of(8, borrow)
    assert (total, written) == (5.0, 5.0)  # the same memory, read and written through the view
    assert during == before + (0 if borrow else 1)  # a view of an owned array takes a reference


@jit_inner()
def _inner_square_step(out, task):
    """A step compiled without Numba's Python wrappers: out[task] = task * task."""
    out[task] = task * task


@jit_inner()
def _inner_sum(x):
    total = 0.0
    for value in x:
        total += value
    return total


@numba.njit
def _calls_inner_sum(x):
    return _inner_sum(x) + 1.0


@pytest.mark.parametrize("parallel", [False, True], ids=["here", "threads"])
def test_an_inner_function_runs_from_compiled_code_and_by_address_but_refuses_a_python_call(parallel):
    x = np.random.default_rng(3).standard_normal(37)
    assert _calls_inner_sum(x) == pytest.approx(float(x.sum()) + 1.0, rel=1e-12)
    out = np.zeros(6, np.int64)
    steps = steps_array(address_of(_inner_square_step, (out,), indexed=True))
    assert _run_write_index(steps, out, parallel) == 1
    np.testing.assert_array_equal(out, np.arange(6) ** 2)
    # compiled without the CPython wrapper (what jit_inner saves): no symbol to call from Python
    (result,) = _inner_sum.overloads.values()
    assert result.library.get_pointer_to_function(result.fndesc.llvm_cpython_wrapper_name) == 0
    with pytest.raises(TypeError, match="_inner_sum is compiled for calls from other compiled functions"):
        _inner_sum(x)  # a clear error, not a jump to address 0


def test_the_kernels_workers_refuse_a_python_call():
    from attnkit.kernels.cpu.backward import _backward_worker
    from attnkit.kernels.cpu.decode import _decode_worker
    from attnkit.kernels.cpu.forward import _forward_worker

    for worker in (_forward_worker, _backward_worker, _decode_worker):
        with pytest.raises(TypeError, match="not from Python"):
            worker(np.zeros((1, 1, 1, 1), np.float32))
