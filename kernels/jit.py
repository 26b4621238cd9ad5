"""`jit`: numba.njit with the on-disk cache where one can be written; `jit_inner`: the same for
functions only compiled code calls, compiled without the Python wrappers no one calls.

Numba's cache checks only the source file of the function it loads: a kernel
in numba_attention.py compiled against an older simd.py or cpu_blas.py would
be loaded as it was (this once hid a wrong exp2 from the tests). So at import,
when the kernel sources differ from the ones the cache was built from, that
cache is discarded (discard_stale_cache). The cache is where Numba puts it
(cache_location): NUMBA_CACHE_DIR when set, else kernels/__pycache__, else, in
a read-only install, the user's cache folder (`attnkit info` says which).

A first call that compiles sits silent for seconds, so the first compilation
of each kernel (forward, backward, decode) in a process says so on stderr, one line
(ATTNKIT_COMPILE_NOTICE=0 silences it); loading from the cache says nothing.

Helpers that only compiled code calls get no machine code of their own: they are linked into
their callers as LLVM IR, and the cache keeps their bitcode ("Machine code only where an address
is taken" below).

Processes share the cache: warmup's compiling processes, DataLoader workers, distributed
ranks. Numba's own index is not safe for two of them saving signatures of one function
at once (LockedFunctionCache says why and what this module does instead).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import weakref
from pathlib import Path

from numba import config as numba_config
from numba import njit
from numba.core import caching, event
from numba.core import codegen as numba_codegen
from numba.core.compiler_lock import global_compiler_lock
from numba.core.cpu import CPUContext
from numba.core.registry import CPUDispatcher
from numba.core.runtime import rtsys

__all__ = [
    "LAZY_MACHINE_CODE", "OVERLOAD_OPTIONS", "announce_as", "cache_location", "code_variant", "defer_scipy_import",
    "discard_stale_cache", "jit", "jit_inner", "keep_machine_code", "quiet_compile_notices", "set_code_variant",
]

_STAMP = "attnkit-kernel-sources.sha256"


def cache_location(folder):
    """(where Numba caches the functions of folder/*.py, how it chose it): the first of Numba's own
    choices that can be written, in its order: NUMBA_CACHE_DIR; folder/__pycache__; the user's cache
    folder (a read-only install); or (None, "nowhere writable": compiled in memory, every process)."""
    from numba.core import caching

    sources = sorted(Path(folder).glob("*.py"))
    if not sources:
        return None, "no sources"
    choices = ((caching.UserProvidedCacheLocator, "NUMBA_CACHE_DIR"), (caching.InTreeCacheLocator, "next to the sources"),
               (caching.UserWideCacheLocator, "the user's cache folder (the package folder is read-only)"))
    for locator_class, how in choices:
        locator = locator_class.from_function(discard_stale_cache, str(sources[0]))
        if locator is not None:
            return Path(locator.get_cache_path()), how
    return None, "nowhere writable: kernels compile in memory in every process"


def cache_folder(folder):
    """Where Numba caches the functions of folder/*.py (cache_location), or None."""
    return cache_location(folder)[0]


def discard_stale_cache(folder=Path(__file__).parent):
    """Delete the *.nbi, *.nbc of the caches (cache_folder) of folder and of every folder below
    it holding sources, unless they were built from all of those *.py files as they are now
    (a kernel in kernels/cpu/ calls helpers in kernels/, and the other way round).

    Returns True when something was discarded. Does nothing where a folder
    cannot be written (a read-only install has no cache there anyway).
    """
    folder = Path(folder)
    sources = sorted(folder.rglob("*.py"))
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.relative_to(folder).as_posix().encode() + b"\0" + source.read_bytes())
    discarded = False
    for source_folder in sorted({source.parent for source in sources} | {folder}):
        cache = cache_folder(source_folder)
        if cache is not None:
            discarded |= _discard_unless_stamped(cache, digest.hexdigest())
    return discarded


def _discard_unless_stamped(cache, stamp_text):
    """Delete cache/*.nb[ic] (and kernels/warmup.py's ready markers) unless cache's stamp reads
    stamp_text; then stamp it. True when deleted."""
    stamp = cache / _STAMP
    try:
        if stamp.read_text(encoding="ascii") == stamp_text:
            return False
    except OSError:
        pass  # no stamp yet
    try:
        stale = list(cache.glob("*.nb[ic]")) + list(cache.glob("attnkit-ready-*"))
        for path in stale:
            path.unlink(missing_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        stamp.write_text(stamp_text, encoding="ascii")
    except OSError:
        return False
    return bool(stale)


discard_stale_cache()


def _scipy_blas_installed():
    """Whether scipy.linalg.cython_blas is installed, found without importing SciPy."""
    import importlib.util

    spec = importlib.util.find_spec("scipy")  # a top-level package: found, not imported
    folders = [] if spec is None else list(spec.submodule_search_locations or ())
    return any(any((Path(folder) / "linalg").glob("cython_blas.*")) for folder in folders)


def defer_scipy_import():
    """Import Numba's numba.np.arraymath with its check for a BLAS answered without importing SciPy.

    Numba imports that module with the registries it loads before its first compilation, and its
    module-level _check_blas imports scipy.linalg (~0.15-0.26 s) to learn that np.dot can be
    compiled. attnkit's kernels call a BLAS of their own (cpu_blas.py: torch's MKL, or SciPy's
    where they import it). Here the check finds scipy.linalg.cython_blas on disk instead, so its
    answer is the same, and Numba's linear algebra still imports SciPy when a function that uses
    it compiles (its ensure_blas is called again then). Nothing is done where the module is
    already imported or Numba's layout is other than this (the import then costs what it did).
    Called when Numba loads its registries (_load_registries), not at import: a process that only
    loads its kernels from the cache never imports numba.np.arraymath or numba.np.linalg (~0.01 s
    of its first call; numba.np.arrayobj, which they import too, a cache load still imports)."""
    if "numba.np.arraymath" in sys.modules:
        return False
    from numba.np import linalg

    real = getattr(linalg, "ensure_blas", None)
    if real is None or not _scipy_blas_installed():
        return False
    linalg.ensure_blas = lambda: None
    try:
        from numba.np import arraymath
    finally:
        linalg.ensure_blas = real
    if getattr(arraymath, "ensure_blas", real) is not real:
        arraymath.ensure_blas = real  # the module-level name its other functions call
    return True


_NUMBA_LOAD_REGISTRIES = CPUContext.load_additional_registries


def _load_registries(self):
    defer_scipy_import()  # before Numba's own imports bring numba.np.arraymath in
    return _NUMBA_LOAD_REGISTRIES(self)


CPUContext.load_additional_registries = _load_registries


class _CompileNotice(event.Listener):
    """One stderr line per kernel (forward, backward, decode: see announce_as) the first time this
    process compiles any attnkit function for it (not when it loads from the cache: no compilation)."""

    def __init__(self):
        self.kernel = "CPU"
        self.told = set()
        self.quiet = False  # warmup() reports its own progress instead (quiet_compile_notices)

    def on_start(self, event):
        function = getattr(event.data["dispatcher"], "py_func", None)
        if function is None or not function.__module__.startswith(__package__) or self.kernel in self.told:
            return
        if self.quiet:  # warmup() reports its jobs instead
            return
        self.told.add(self.kernel)
        sys.stderr.write(f"attnkit: compiling the {self.kernel} kernel for this CPU (first use: seconds; "
                         "cached on disk for later processes; attnkit.warmup() compiles ahead)\n")
        sys.stderr.flush()

    def on_end(self, event):
        pass


_NOTICE = _CompileNotice()
if os.environ.get("ATTNKIT_COMPILE_NOTICE", "1") != "0":
    event.register("numba:compile", _NOTICE)


@contextlib.contextmanager
def quiet_compile_notices():
    """No per-kernel compile notice inside: warmup() says what it compiles, job by job."""
    previous, _NOTICE.quiet = _NOTICE.quiet, True
    try:
        yield
    finally:
        _NOTICE.quiet = previous


def announce_as(kernel):
    """Name the kernel that the compilations from here on are for, in the compile notice."""
    _NOTICE.kernel = kernel


class _LockedIndexDataFile(caching.IndexDataCacheFile):
    """Numba's index and data files for one function, with saves that processes can make at once.

    Numba's save reads the index, numbers a new data file after the entries it found, writes
    the index, then the data. Two processes saving different signatures at the same moment can
    pick the same number: the index then names one signature's machine code under the other's
    key, and a later process calls it with arguments of other types (a crash, or wrong results).
    Here the index is read, updated and written under one lock per cache folder, each data file
    is named after its key (two keys never share a file, even where the lock cannot be had),
    and the data is written before the index names it (a reader never finds an entry without
    its file). Loading is Numba's: each file is replaced whole, never seen half written.
    """

    LOCK_NAME = "attnkit-cache.lock"
    LOCK_TIMEOUT_S = 120.0  # a save takes milliseconds; a lock held this long is not coming back

    def save(self, key, data):
        from filelock import FileLock, Timeout  # imported when something is saved: a load needs none

        lock = FileLock(os.path.join(self._cache_path, self.LOCK_NAME), timeout=self.LOCK_TIMEOUT_S)
        try:
            with lock:
                overloads = self._load_index()
                name = overloads.get(key) or self.data_name_of(key)
                self._save_data(name, data)
                if overloads.get(key) != name:
                    overloads[key] = name
                    self._save_index(overloads)
        except Timeout:
            pass  # not cached this time: the function still runs, compiled in this process

    def data_name_of(self, key):
        """The data file's name for a key: (signature, target, bytecode hashes) as Numba tells
        types apart, by their names."""
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
        return f"{self._index_name[: -len('.nbi')]}.{digest}.nbc"


_code_variant = [""]


def code_variant():
    """The product paths' name set by set_code_variant ("" before microkernels is imported)."""
    return _code_variant[0]


def set_code_variant(text):
    """Name the product paths the kernels are compiled with (microkernels sets it at import): the same
    source compiles to other code under ATTNKIT_CPU_BF16=dpbf16 on an AMX machine, so the on-disk
    cache keys carry it and the two never load each other's code."""
    _code_variant[0] = text


class LockedFunctionCache(caching.FunctionCache):
    """Numba's FunctionCache with saves that processes can make at once (_LockedIndexDataFile),
    loads that keep what a function needs run before its code is called (its reload_init), and
    loads that do not first load all of Numba's registries.

    Numba refreshes the whole target context before every cache load: it imports and installs
    every registry it has (random, typed containers, polynomials, ...), ~0.15 s of a first call
    whose kernels are all in the cache. Loaded machine code needs none of it, only Numba's
    runtime (NRT), whose functions it calls, and the C helpers Numba registers when its core is
    imported. A compilation still refreshes the context first (Numba's compiler does so itself).
    tests/test_first_calls.py checks that every attnkit function in the cache links against no
    symbol that only a registry provides.

    Numba runs a loaded function's reload_init (for a parallel function: start the threading
    layer) but does not keep it on the loaded library, so a function compiled later that calls
    it is cached without it. A process whose first call loads that caller then calls into a
    threading layer nobody started: a segfault. It happened to launch.py's _fan_out, compiled
    once and called by every kernel: float32 in one process, float64's kernel compiled in a
    second, float64 first in a third (tests/test_shared_cache.py).
    """

    _RELOAD_INIT = 7  # where CompileResult._reduce puts reload_init in the cached tuple

    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _LockedIndexDataFile(
            cache_path=self._cache_path, filename_base=self._impl.filename_base,
            source_stamp=self._impl.locator.get_source_stamp(),
        )  # fmt: skip

    def _index_key(self, sig, codegen):
        return (*super()._index_key(sig, codegen), _code_variant[0])

    def load_overload(self, sig, target_context):
        if not hasattr(self, "_guard_against_spurious_io_errors"):  # a Numba laid out otherwise: its own load
            return super().load_overload(sig, target_context)
        rtsys.initialize(target_context)  # what a load needs of Numba's context.refresh()
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        return None  # the guard swallowed a spurious I/O error: compiled instead, as in Numba

    def _load_overload(self, sig, target_context):
        if not self._enabled:
            return None
        data = self._cache_file.load(self._index_key(sig, target_context.codegen()))
        if data is None:
            return None
        result = self._impl.rebuild(target_context, data)
        result.library._reload_init.update(data[self._RELOAD_INIT])  # inherited by whatever links it
        return result


# ---------------------------------------------------------------------------
# Machine code only where an address is taken
# ---------------------------------------------------------------------------
# Numba emits machine code for every library it finalizes. A helper that only other compiled
# functions call (jit_inner, not a step) is linked into each caller as LLVM IR and compiled again
# there, so its own machine code never runs: 9-10% of a cold warmup (the kernel log, v58). Here an
# attnkit library without a Python entry (no CPython or C wrapper) is finalized up to its optimized
# module, and gets machine code when an address in it is first asked for: a step's
# (launch.address_of), or anything else's. Until then the on-disk cache keeps its bitcode, which is
# what a later compilation links. The machine code of what does run is Numba's, unchanged.
# Such a library skips Numba's module passes too: a caller links it and runs them over the whole
# module, its own code and the helper's together, so the helper's own run served nothing (cold
# warmup 5-9% faster; kernel log v59). The exception: a helper that asks for its own vector width
# (simd.wide_vectors) is optimized alone, as its loops must be vectorised before a caller inlines them.
# ATTNKIT_LAZY_MACHINE_CODE=0 turns this off (every library compiled at once, as Numba does);
# ATTNKIT_LAZY_OPTIMIZATION=0 only the skipped module passes.

_ATTNKIT_PREFIX = "_ZN7attnkit"  # Numba's mangling of functions in the attnkit package
_DEFERRED_ENVS = weakref.WeakValueDictionary()  # a deferred library's environment globals -> the library
# Numba's own methods, replaced by _install_lazy_machine_code (None where it did not install)
_NUMBA_FINALIZE_FINAL_MODULE = _NUMBA_GET_POINTER = _NUMBA_SET_ENV = _NUMBA_SERIALIZE = None
_NUMBA_GET_COMPILED_OBJECT = _NUMBA_OPTIMIZE_FINAL_MODULE = None
_DEFER_OPTIMIZATION = os.environ.get("ATTNKIT_LAZY_OPTIMIZATION", "1") != "0"


def _deferrable(module):
    """Whether a finalized module is an attnkit library no Python entry calls: it defines functions,
    one of them attnkit's, and neither a CPython nor a C-callback wrapper. (A library loaded from
    machine code in the cache defines none in its module: never deferred.)"""
    own = False
    for function in module.functions:
        if function.is_declaration:
            continue
        name = function.name
        if name.startswith(("cpython.", "cfunc.")):
            return False
        own = own or name.startswith(_ATTNKIT_PREFIX)
    return own


def _tuned_alone(module):
    """Whether one of the module's own functions asks LLVM for a vector width of its own
    (simd.wide_vectors): inlined before its loops were vectorised, they would get their caller's."""
    return any(b'"prefer-vector-width"' in attributes for function in module.functions
               if function.name.startswith(_ATTNKIT_PREFIX) and not function.is_declaration
               for attributes in function.attributes)  # fmt: skip


def _left_to_callers(module):
    """Whether a library's module passes are left to its callers (who link and optimize its IR with
    their own; _materialize runs them if its machine code is ever asked for): a deferrable library
    none of whose functions asks for a vector width of its own."""
    return _DEFER_OPTIMIZATION and _deferrable(module) and not _tuned_alone(module)


def _optimize_final_module(self):
    if not _left_to_callers(self._final_module):
        _NUMBA_OPTIMIZE_FINAL_MODULE(self)


def _finalize_final_module(self):
    if not _deferrable(self._final_module):
        return _NUMBA_FINALIZE_FINAL_MODULE(self)
    # finalize skipped its module passes, or the cache kept its bitcode as finalize left it
    self._attnkit_unoptimized = _left_to_callers(self._final_module)
    self._finalize_dynamic_globals()
    self._verify_declare_only_symbols()
    self._final_module._CPUCodeLibrary__library = weakref.proxy(self)  # for the object-code hooks, later
    self._attnkit_deferred = True
    self._attnkit_envs = {}
    for variable in self._final_module.global_variables:
        if variable.name.startswith("_ZN08NumbaEnv") and not variable.is_declaration:
            _DEFERRED_ENVS[variable.name] = self
    self._finalized = True


def _materialize(library):
    """Emit a deferred library's machine code now (nothing when it has some, or is not deferred)."""
    if not getattr(library, "_attnkit_deferred", False):
        return
    with global_compiler_lock:
        if not library._attnkit_deferred:
            return
        library._attnkit_deferred = False
        if library._attnkit_unoptimized:
            library._attnkit_unoptimized = False
            _NUMBA_OPTIMIZE_FINAL_MODULE(library)
            library._final_module.verify()
            library._final_module._CPUCodeLibrary__library = weakref.proxy(library)
        cleanup = library._codegen._add_module(library._final_module)
        if cleanup:
            weakref.finalize(library, cleanup)
        library._finalize_specific()
        for name, env in library._attnkit_envs.items():
            _NUMBA_SET_ENV(library._codegen, name, env)
        library._attnkit_envs = {}


def _get_pointer_to_function(self, name):
    self._ensure_finalized()
    if getattr(self, "_attnkit_deferred", False):
        try:
            defined = not self._final_module.get_function(name).is_declaration
        except NameError:
            defined = False
        if defined:
            _materialize(self)
    return _NUMBA_GET_POINTER(self, name)


def _set_env(self, env_name, env):
    library = _DEFERRED_ENVS.get(env_name)
    if library is not None and library._attnkit_deferred:
        library._attnkit_envs[env_name] = env  # set when the library gets its machine code
        return
    _NUMBA_SET_ENV(self, env_name, env)


def _serialize_using_object_code(self):
    self._ensure_finalized()
    if getattr(self, "_attnkit_deferred", False):  # no machine code: the bitcode, which links
        self._attnkit_saved_bitcode = True
        return self.serialize_using_bitcode()
    return _NUMBA_SERIALIZE(self)


def _get_compiled_object(self):
    _materialize(self)
    return _NUMBA_GET_COMPILED_OBJECT(self)


def keep_machine_code(dispatcher, signature, result):
    """After an address in result's library was taken: if the on-disk cache holds that library as
    bitcode (saved before anyone asked for an address), save it again with its machine code, so
    that later processes load the step ready to run rather than compiling it."""
    if getattr(result.library, "_attnkit_saved_bitcode", False):
        result.library._attnkit_saved_bitcode = False
        cache = getattr(dispatcher, "_cache", None)
        if isinstance(cache, LockedFunctionCache):
            cache.save_overload(signature, result)


def _install_lazy_machine_code():
    """Patch Numba's JIT code libraries (see above) where Numba is laid out as this was written for."""
    global _NUMBA_FINALIZE_FINAL_MODULE, _NUMBA_GET_POINTER, _NUMBA_SET_ENV, _NUMBA_SERIALIZE
    global _NUMBA_GET_COMPILED_OBJECT, _NUMBA_OPTIMIZE_FINAL_MODULE
    if os.environ.get("ATTNKIT_LAZY_MACHINE_CODE", "1") == "0":
        return False
    library, codegen = numba_codegen.JITCodeLibrary, numba_codegen.JITCPUCodegen
    needed = (
        (library, ("_optimize_final_module", "_finalize_final_module", "_finalize_dynamic_globals",
                   "_verify_declare_only_symbols", "_finalize_specific", "get_pointer_to_function",
                   "serialize_using_object_code", "serialize_using_bitcode", "_get_compiled_object",
                   "_object_compiled_hook")),
        (codegen, ("_add_module", "set_env")),
    )  # fmt: skip
    if not all(hasattr(owner, name) for owner, names in needed for name in names):
        return False
    _NUMBA_FINALIZE_FINAL_MODULE = library._finalize_final_module
    _NUMBA_GET_POINTER = library.get_pointer_to_function
    _NUMBA_SET_ENV = codegen.set_env
    _NUMBA_SERIALIZE = library.serialize_using_object_code
    _NUMBA_GET_COMPILED_OBJECT = library._get_compiled_object
    _NUMBA_OPTIMIZE_FINAL_MODULE = library._optimize_final_module
    library._optimize_final_module = _optimize_final_module
    library._finalize_final_module = _finalize_final_module
    library.get_pointer_to_function = _get_pointer_to_function
    library.serialize_using_object_code = _serialize_using_object_code
    library._get_compiled_object = _get_compiled_object
    codegen.set_env = _set_env
    return True


LAZY_MACHINE_CODE = _install_lazy_machine_code()


# numba.extending.overload's jit_options for attnkit's overloads: their implementations are only ever
# called from compiled code, so they need no CPython or C-callback wrapper; without one their
# libraries are also deferred (machine code only where an address is taken, above). With wrappers,
# 48 overload libraries of a float32 warmup got machine code of their own: 1.4 s.
OVERLOAD_OPTIONS = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}


def jit(**options):
    """njit(**options) with the on-disk cache (LockedFunctionCache), or none where none can be written.
    For functions called from Python: the kernels' entries, and helpers Python calls as well
    (inline="always" ones are compiled into their njit callers, never on their own).

    Numba raises RuntimeError when neither the package directory nor the user
    cache directory is writable (read-only installs); the function then compiles
    in memory on first use.

    Division follows NumPy (error_model="numpy": x / 0 is inf or nan, as in torch, including
    in a user's score_mod) rather than raising ZeroDivisionError. The kernels' divisions are
    guarded, and the raising branch had a cost beyond its test: a function that may raise
    keeps the reference-count updates on its array arguments (Numba prunes them only where
    one exit follows the entry), atomic updates on arrays every worker shares, a task at a
    time: _finish_rows alone made 12 per call (docs/kernel-log.md, v24).
    """
    options.setdefault("error_model", "numpy")

    def decorate(func):
        return _cached(njit(**options)(func), func)

    return decorate


class InnerDispatcher(CPUDispatcher):
    """A dispatcher for code that only compiled code calls (see jit_inner): a call from Python
    raises TypeError instead of jumping to the CPython wrapper it was compiled without."""

    def __call__(self, *args, **kwargs):
        raise TypeError(f"attnkit: {self.py_func.__module__}.{self.py_func.__qualname__} is compiled for calls from "
                        "other compiled functions (or by address, kernels/cpu/launch.py), not from Python")


def jit_inner(**options):
    """jit(**options) for a function that only compiled code calls: other njit functions, or
    launch's steps by address. It is compiled without Numba's CPython and C-callback wrappers
    (boxing and unboxing every argument: a tenth of a cold compile of the kernels, v52 in
    docs/kernel-log.md), so it cannot be called from Python: InnerDispatcher says so."""
    options.setdefault("error_model", "numpy")
    options.update(nopython=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
    options.setdefault("boundscheck", None)

    def decorate(func):
        if numba_config.DISABLE_JIT:
            return func
        return _cached(InnerDispatcher(py_func=func, locals={}, targetoptions=dict(options)), func)

    return decorate


def _cached(dispatcher, func):
    try:
        dispatcher._cache = LockedFunctionCache(func)  # what njit(cache=True) does, with its own cache
    except RuntimeError:
        pass  # Numba's NullCache: compiled in every process
    return dispatcher
