"""How many rows of a small batch to multiply by a weight matrix in one BLAS call.

OpenBLAS's x86-64 builds for AVX-512 cores (SkylakeX and the kinds that use its kernels) take
a product (m, k) @ (k, n) with m*n*k <= 1e6 through "small-matrix" kernels that read the
operands in place; a larger one first packs the whole weight matrix into a buffer, which costs
several passes over it. For prediction batches of a few rows the packing is most of the work,
so a product of a few rows is cut into calls the small kernels take, up to the number of
calls beyond which packing once is cheaper again. ``bench/small_batches.py`` measures the
rule against one call per layer (docs/performance-log.md has the figures).

The rule is a pure function of the shapes and of which BLAS this process loaded, so every
process with the same libraries computes a prediction the same way, to the bit. Other BLAS
builds keep one call per product.
"""

from __future__ import annotations

import functools

#: m*n*k at or under which OpenBLAS's small-matrix kernels take a product (no packing).
SMALL_MNK = 1_000_000

#: Cut a float32 product into at most this many calls; beyond it, one packed product is
#: cheaper. float64's small kernels gain less, so float64 stops sooner.
MAX_CALLS = 6
MAX_CALLS_FLOAT64 = 3

#: At most this many calls of one row each (matrix-vector products, for layers too large for
#: the small kernels): each reads the whole matrix, so beyond a few rows packing wins.
MAX_ROW_CALLS = 4

#: OpenBLAS core names (``openblas_get_corename``) whose builds have small-matrix kernels.
_SMALL_KERNEL_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


@functools.cache
def small_kernels() -> bool:
    """Whether numpy's BLAS is an OpenBLAS with small-matrix kernels for this CPU."""
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415 - optional introspection
    except ImportError:  # pragma: no cover - a dependency of the package
        return False
    blas = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    # numpy's own BLAS, when other libraries loaded theirs as well
    ours = [info for info in blas if "numpy" in str(info.get("filepath", ""))] or blas[:1]
    return bool(ours) and all(
        info.get("internal_api") == "openblas"
        and str(info.get("architecture", "")).lower() in _SMALL_KERNEL_CORES
        for info in ours
    )


def rows_per_call(
    rows: int, n_in: int, n_out: int, itemsize: int = 4, *, small: bool | None = None
) -> int:
    """Rows to give each BLAS call for (rows, n_in) @ (n_in, n_out) of ``itemsize``-byte
    floats: ``rows`` (one call) unless cutting the batch into calls small enough for the
    small-matrix kernels pays.

    ``small`` overrides the detection of :func:`small_kernels` (for tests).
    """
    if small is None:
        small = small_kernels()
    size = n_in * n_out
    if not small or rows <= 1 or rows * size <= SMALL_MNK:
        return rows
    # NOTE: a single row is a matrix-vector product, which never packs, so layers too large
    # for the small kernels still gain from one call per row while there are few rows.
    per_call = max(1, SMALL_MNK // size)
    by_size = MAX_CALLS if itemsize <= 4 else MAX_CALLS_FLOAT64
    most = MAX_ROW_CALLS if per_call == 1 else by_size
    if -(-rows // per_call) > most:
        return rows
    return per_call
