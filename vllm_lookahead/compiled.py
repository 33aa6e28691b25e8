"""How the drafter's kernels are compiled and how their records are declared (numba).

Every kernel is compiled once and cached on disk (`kernel`). Numba decides whether a cached kernel
is stale from the file that defines it alone, but a kernel carries the code of every kernel it
calls, and those live in other modules (the Jacobi window, the pool, the text index...). So the
package's kernels are stamped with one digest of every module that defines kernels
(`_PackageStamp`): an edit anywhere recompiles them all, never a kernel with a stale callee.

Records are numba structrefs (`define_record`): named fields, reachable from Python only through the
kernels that create and read them. The arrays in them are allocated through `zeros`/`grown`, which
keep a drafter-wide byte count (`memory`, one cell shared by every record of one drafter) that the
memory budget reads without walking the records.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import njit, types
from numba.core import caching, cgutils
from numba.experimental import structref
from numba.extending import intrinsic, register_jitable

from vllm_lookahead.log import get_logger

_PACKAGE_DIR = Path(__file__).resolve().parent
TESTED_NUMBA = "0.65"
"""The numba the kernels were tested with (setup.py's extras ask for it)."""
if not numba.__version__.startswith(TESTED_NUMBA + "."):
    get_logger(__name__).warning(
        "vllm-lookahead: numba %s is untested (tested: %s.x); the drafter's kernels may not "
        "compile", numba.__version__, TESTED_NUMBA)


@cache
def _kernel_sources_digest() -> str:
    """A digest of every module of the package that compiles kernels."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.glob("*.py")):
        source = path.read_bytes()
        if b"@kernel" in source or b"@jitable" in source or path.name == "compiled.py":
            digest.update(path.name.encode() + b"\0" + source)
    return digest.hexdigest()


class _PackageStamp:
    """A cache locator mixin: only the package's own kernels, stamped with the package digest."""

    @classmethod
    def from_function(cls, py_func: Any, py_file: str) -> Any:
        if Path(py_file).resolve().parent != _PACKAGE_DIR:
            return None
        return super().from_function(py_func, py_file)  # type: ignore[misc]

    def get_source_stamp(self) -> str:
        return _kernel_sources_digest()


def _install_package_stamp() -> bool:
    """Put the package's locators first in numba's list (where the numba in use has one);
    returns whether kernels may be cached. A numba without these classes compiles the kernels
    in every process instead of risking a stale cache."""
    impl, *bases = (getattr(caching, name, None) or getattr(caching, f"_{name}", None) for name in
                    ("CacheImpl", "UserProvidedCacheLocator", "InTreeCacheLocator",
                     "UserWideCacheLocator"))
    if impl is None or not hasattr(impl, "_locator_classes") or None in bases:
        return False
    if any(issubclass(c, _PackageStamp) for c in impl._locator_classes):
        return True
    stamped = [type(f"Package{base.__name__.lstrip('_')}", (_PackageStamp, base), {})
               for base in bases]
    impl._locator_classes = [*stamped, *impl._locator_classes]
    return True


jitable = register_jitable
"""Plain Python that kernels compile inline: arithmetic that the reference runs as Python and the
compiled drafter runs compiled, the very same operations in the same order."""

CACHE = _install_package_stamp() and os.environ.get("VLLM_LOOKAHEAD_NO_KERNEL_CACHE") != "1"


def kernel(fn: Callable[..., Any] | None = None, *, inline: bool = False) -> Any:
    """`@kernel`: a compiled, cached function; `@kernel(inline=True)` for the small helpers of
    inner loops."""
    options = {"cache": CACHE, "inline": "always" if inline else "never"}
    if fn is None:
        return lambda f: njit(**options)(f)
    return njit(**options)(fn)


class RecordType(types.StructRef):
    """The numba type of a record; each record declares its own subclass at module level (the
    disk cache pickles types by name)."""

    def preprocess_fields(self, fields: Any) -> Any:
        return tuple((field, types.unliteral(typ)) for field, typ in fields)


def define_record(type_class: type[RecordType], proxy: type[structref.StructRefProxy],
                  fields: list[tuple[str, Any]]) -> RecordType:
    """Registers a record: its numba type (returned, for `structref.new` and for fields of other
    records) and the Python proxy that kernels return it as."""
    structref.register(type_class)
    structref.define_boxing(type_class, proxy)
    return type_class(fields)


I32 = types.int32[::1]
I32_2D = types.int32[:, ::1]
I64 = types.int64[::1]
U8 = types.uint8[::1]
U16 = types.uint16[::1]
F64 = types.float64[::1]
F64_2D = types.float64[:, ::1]
MEMORY = I64
"""The byte count shared by every record of one drafter: a one-cell array."""


@kernel(inline=True)
def zeros(memory: np.ndarray, like: np.ndarray, n: int) -> np.ndarray:
    """A zeroed array of `like`'s dtype and n entries (rows of `like`'s width for a 2-D one),
    counted in `memory`; the caller frees `like` (`release`) if it replaces it."""
    new = np.zeros((n,) + like.shape[1:], dtype=like.dtype)  # noqa: RUF005 (numba)
    memory[0] += new.nbytes
    return new


@kernel(inline=True)
def release(memory: np.ndarray, array: np.ndarray) -> None:
    memory[0] -= array.nbytes


@kernel(inline=True)
def replaced(memory: np.ndarray, old: np.ndarray, n: int) -> np.ndarray:
    """A zeroed array of n entries in place of `old` (whose bytes are no longer counted)."""
    release(memory, old)
    return zeros(memory, old, n)


@kernel(inline=True)
def grown(memory: np.ndarray, old: np.ndarray, need: int) -> np.ndarray:
    """`old` if it has room for `need` entries, else a copy with room (grown by half, at least
    16 entries); the caller stores the result where `old` was."""
    if old.shape[0] >= need:
        return old
    cap = max(16, old.shape[0])
    while cap < need:
        cap += cap // 2
    new = zeros(memory, old, cap)
    new[:old.shape[0]] = old
    release(memory, old)
    return new


@intrinsic
def borrowed(typingctx: Any, array: Any) -> Any:
    """The same array without a share of its ownership: reading and passing it costs no reference
    counting (which writes to the header of every array read, a cache miss per array per row on
    a large batch). Valid while the record field it was read from is not replaced."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        source = context.make_array(array_type)(context, builder, args[0])
        view = context.make_array(array_type)(context, builder)
        view.meminfo = cgutils.get_null_value(view.meminfo.type)
        view.parent = cgutils.get_null_value(view.parent.type)
        view.nitems = source.nitems
        view.itemsize = source.itemsize
        view.data = source.data
        view.shape = source.shape
        view.strides = source.strides
        return view._getvalue()

    return array(array), codegen
