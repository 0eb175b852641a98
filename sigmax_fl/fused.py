"""The aggregation pass as one fused C loop, compiled on this machine the first time it is needed.

Why: averaging is memory-bound only if every reply value is read once and used for everything
while it is in a register. With torch ops, each value goes through three ops (delta, its
square for the norm, its weighted sum), each a separate sweep through the caches, and a large
model's pass ran at 2-3x the time it takes to read the replies. Here one loop reads
``w_k - w_global`` once and feeds the squared norm and the weighted sum from it, eight replies
at a time per register tile, :data:`THREADS` threads taking runs of up to :data:`CHUNK` tiles
from one shared counter. The threads are the kernel's own, POSIX threads started and joined
inside the call (which ctypes makes without the GIL): at 1M parameters a pass takes 2-3 ms
here, and a Python thread per pass, started and handed the GIL, added about 0.4 ms to it. The
result goes to memory in streaming stores where it is 16-byte aligned on x86 (the npy bytes
of :class:`~sigmax_fl.codec.FreshArrays` are): an ordinary store first reads the line it
writes, a tenth more memory traffic, and the pass took about 5 % longer at 1M parameters and
10 % at 10M here. Replies read in place from npy bytes (:class:`~sigmax_fl.codec.NpyViews`)
give their addresses without numpy, which asks 3 µs an array.

The source below travels inside the package (so inside Flower's FAB); ``cc`` (or ``$CC``)
builds it into a private temporary directory once per process, and only for models of at
least :data:`MIN_PARAMS` parameters, where a pass takes milliseconds. No compiler, or a failed
build, is logged once and leaves :func:`sigmax_fl.strategy.norms_and_average`'s torch pass in
use; ``SIGMAX_FL_FUSED=0`` in the environment forbids building altogether.

Arithmetic (fixed by the source, so the same on every machine; ``-ffp-contract=off``):
per value, ``d_k = w_k - w_global`` and ``w_global + sum_k weight_k * d_k`` summed in
reply order in float32, each product and sum rounded on its own; per tile of :data:`TILE`
values, each reply's sum of ``d_k^2`` over 8 float32 lanes, then the tiles' sums in float64.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sigmax_fl.codec import NpyViews

log = logging.getLogger(f"flwr.{__name__}")

MIN_PARAMS = 1 << 18
"""Models smaller than this keep the torch pass: it takes well under a millisecond there, and
building the kernel costs about 0.1 s once."""
TILE = 8192
"""Values per tile: its float32 running sums (32 KiB) stay in the L1 cache while eight replies
are added in."""
CHUNK = 8
"""Tiles a thread takes at a time (8 x 32 KiB of each reply): small enough that threads finish
together when one of them is slowed, large enough that taking a run costs nothing."""
ENV_SWITCH = "SIGMAX_FL_FUSED"


def _cores() -> int:
    """Cores this process may run on: its affinity, so that a container's CPU set counts."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


THREADS = max(1, min(8, _cores()))
"""Threads of a pass, one per core this process may use (up to 8): each adds its share of
memory bandwidth, and a few saturate it."""

SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#define TILE %(tile)d
#define GROUP 8
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), __may_alias__));
#define LD(p) (*(const v8u *)(p))
#define ST(p, v) (*(v8u *)(p) = (v))

/* The result is written once and not read again here: where the target allows, past the
   caches (a streaming store), so that writing it does not first read it from memory. */
static inline void store(float *o, v8 v)
{
#if defined(__SSE__)
    if (((uintptr_t)o & 15) == 0) {
        _mm_stream_ps(o, (__m128){v[0], v[1], v[2], v[3]});
        _mm_stream_ps(o + 4, (__m128){v[4], v[5], v[6], v[7]});
        return;
    }
#endif
    ST(o, v);
}

/* Values [s, s + m) of one array: out = g + sum_k w[k] (x_k - g); sq[k] = sum (x_k - g)^2. */
static void tile_pass(const float *const *xs, int64_t replies, const float *g, const float *w,
                      float *out, double *sq, int64_t s, int64_t m)
{
    v8 acc[TILE / 8];
    float *accf = (float *)acc;
    const int64_t mv = m / 32 * 32;
    const float *gs = g + s;
    for (int64_t k0 = 0; k0 < replies; k0 += GROUP) {
        const int64_t kn = replies - k0 < GROUP ? replies - k0 : GROUP;
        const int first = k0 == 0, last = k0 + kn == replies;
        v8 lanes[GROUP];
        float tail[GROUP];
        for (int64_t k = 0; k < kn; k++) {
            lanes[k] = (v8){0};
            tail[k] = 0.0f;
        }
        for (int64_t i = 0; i < mv; i += 32) {
            const v8 g0 = LD(gs + i), g1 = LD(gs + i + 8);
            const v8 g2 = LD(gs + i + 16), g3 = LD(gs + i + 24);
            v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            if (!first) {
                a0 = acc[i / 8]; a1 = acc[i / 8 + 1]; a2 = acc[i / 8 + 2]; a3 = acc[i / 8 + 3];
            }
            for (int64_t k = 0; k < kn; k++) {
                const float *x = xs[k0 + k] + s + i;
                const float wk = w[k0 + k];
                const v8 d0 = LD(x) - g0, d1 = LD(x + 8) - g1;
                const v8 d2 = LD(x + 16) - g2, d3 = LD(x + 24) - g3;
                lanes[k] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
                a0 += wk * d0; a1 += wk * d1; a2 += wk * d2; a3 += wk * d3;
            }
            if (last) {
                float *o = out + s + i;
                store(o, g0 + a0); store(o + 8, g1 + a1);
                store(o + 16, g2 + a2); store(o + 24, g3 + a3);
            } else {
                acc[i / 8] = a0; acc[i / 8 + 1] = a1; acc[i / 8 + 2] = a2; acc[i / 8 + 3] = a3;
            }
        }
        for (int64_t i = mv; i < m; i++) {
            float a = first ? 0.0f : accf[i];
            for (int64_t k = 0; k < kn; k++) {
                const float d = xs[k0 + k][s + i] - gs[i];
                tail[k] += d * d;
                a += w[k0 + k] * d;
            }
            if (last) out[s + i] = gs[i] + a; else accf[i] = a;
        }
        for (int64_t k = 0; k < kn; k++) {
            double t = tail[k];
            for (int j = 0; j < 8; j++) t += lanes[k][j];
            sq[k0 + k] = t;
        }
    }
}

/* Tiles [t0, t1) of all arrays, numbered array after array; row t of sq gets tile t's sums.
   xs holds arrays x replies pointers, array by array. */
void sigmax_fused_pass(int64_t arrays, int64_t replies, const float *const *xs,
                       const float *const *gs, float *const *outs, const int64_t *lens,
                       const float *w, double *sq, int64_t t0, int64_t t1)
{
    int64_t first = 0; /* number of this array's first tile */
    for (int64_t a = 0; a < arrays && first < t1; a++) {
        const int64_t tiles = (lens[a] + TILE - 1) / TILE;
        for (int64_t t = t0 > first ? t0 - first : 0; t < tiles && first + t < t1; t++) {
            const int64_t s = t * TILE, m = lens[a] - s < TILE ? lens[a] - s : TILE;
            double *row = sq + (first + t) * replies;
            tile_pass(xs + a * replies, replies, gs[a], w, outs[a], row, s, m);
        }
        first += tiles;
    }
}

struct pass {
    int64_t arrays, replies;
    const float *const *xs, *const *gs;
    float *const *outs;
    const int64_t *lens;
    const float *w;
    double *sq;
    int64_t tiles, chunk, next;
};

/* Tiles [0, tiles), `chunk` at a time, each run taken from the counter shared by every thread
   of the pass: a thread that loses its core to another process takes fewer runs instead of
   holding the whole pass back. */
static void *take_runs(void *arg)
{
    struct pass *p = arg;
    for (;;) {
        const int64_t t0 = __atomic_fetch_add(&p->next, p->chunk, __ATOMIC_RELAXED);
        if (t0 >= p->tiles) {
#if defined(__SSE__)
            _mm_sfence(); /* the streamed stores are done before the pass is */
#endif
            return NULL;
        }
        sigmax_fused_pass(p->arrays, p->replies, p->xs, p->gs, p->outs, p->lens, p->w, p->sq, t0,
                          t0 + p->chunk < p->tiles ? t0 + p->chunk : p->tiles);
    }
}

#define MAX_HELPERS 63

/* The whole pass on up to `threads` threads, the caller's among them; returns how many helper
   threads ran. A helper that cannot be started only leaves more runs to the others. */
int64_t sigmax_fused_threads(int64_t arrays, int64_t replies, const float *const *xs,
                             const float *const *gs, float *const *outs, const int64_t *lens,
                             const float *w, double *sq, int64_t tiles, int64_t chunk,
                             int64_t threads)
{
    struct pass p = {arrays, replies, xs, gs, outs, lens, w, sq, tiles, chunk, 0};
    pthread_t helpers[MAX_HELPERS];
    int64_t started = 0;
    while (started < threads - 1 && started < MAX_HELPERS
           && pthread_create(&helpers[started], NULL, take_runs, &p) == 0)
        started++;
    take_runs(&p);
    for (int64_t i = 0; i < started; i++) pthread_join(helpers[i], NULL);
    return started;
}
"""

_FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC", "-pthread")
_P = ctypes.c_void_p
_I = ctypes.c_int64


def switched_off() -> bool:
    """``SIGMAX_FL_FUSED=0``: no kernel and no allocator setting, the server as before."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in {"0", "off", "false", "no"}


def build() -> tuple[ctypes.CDLL | None, str]:
    """Build the kernel now: it, or None and why not (for the log and ``sigmax-fl doctor``)."""
    if switched_off():
        return None, f"switched off ({ENV_SWITCH}=0)"
    compiler = shlex.split(os.environ.get("CC") or "cc")  # CC may carry a wrapper: "ccache gcc"
    if not compiler or shutil.which(compiler[0]) is None:
        return None, f"no C compiler '{' '.join(compiler)}' (set CC)"
    try:
        kernel, problem = _build(compiler)
    except Exception as err:  # e.g. a noexec temporary directory: never an error in a round
        kernel, problem = None, f"{type(err).__name__}: {err}"
    if kernel is None:
        return None, f"could not build it with '{' '.join(compiler)}' ({problem})"
    return kernel, f"built with '{' '.join(compiler)}'"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel, built once per process; None (logged once) where it cannot be, or is off."""
    kernel, why = build()
    if kernel is None:
        (log.info if switched_off() else log.warning)(
            "fused aggregation kernel: %s; large models are averaged by the slower torch pass",
            why,
        )
    return kernel


def _build(compiler: list[str]) -> tuple[ctypes.CDLL | None, str]:
    """Compile and load the kernel; None and the compiler's last line if it fails."""
    with tempfile.TemporaryDirectory(prefix="sigmax-fl-kernel-", ignore_cleanup_errors=True) as d:
        src, lib = Path(d) / "fused.c", Path(d) / "fused.so"
        src.write_text(SOURCE % {"tile": TILE})
        problem = ""
        # -march=native first (AVX2 / AVX-512 here); some compilers and targets refuse it.
        for extra in (("-march=native",), ()):
            try:
                built = subprocess.run(
                    [*compiler, *_FLAGS, *extra, "-o", str(lib), str(src)],
                    capture_output=True,
                    text=True,
                    errors="replace",
                    timeout=120,
                )
            except (OSError, subprocess.TimeoutExpired) as err:
                problem = str(err)
                continue
            if built.returncode == 0:
                kernel = ctypes.CDLL(str(lib))  # mapped now: the file may go with the directory
                fn = kernel.sigmax_fused_threads
                fn.argtypes = [_I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _I]
                fn.restype = _I
                return kernel, ""
            problem = (built.stderr.strip().splitlines() or ["no output"])[-1]
    return None, problem


def prepare(shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Ready this process to average a model of these shapes, before its first round.

    For a model of at least :data:`MIN_PARAMS` parameters: build the kernel now rather than
    inside a round, and keep freed memory for reuse (:func:`_keep_freed_memory`).
    """
    if switched_off() or sum(math.prod(shape) for shape in shapes.values()) < MIN_PARAMS:
        return
    library()
    _keep_freed_memory()


@functools.cache
def _keep_freed_memory() -> None:
    """Let glibc keep up to 512 MiB free at the top of its heap, and serve blocks of <= 32 MiB.

    Each round the server frees the replies and the previous global model and allocates as
    much again. By default glibc hands large freed blocks back to the kernel (its mmap
    threshold adapts up to 32 MiB, but the heap top is trimmed past twice that threshold), so
    the next round writes into never-touched pages: a page fault per 4 KiB, about 14 ms for a
    10M-parameter result in four arrays here, more than the whole averaging pass. Arrays
    above 32 MiB (8.4M float32 values) are still mapped afresh each round. The cost is a
    resident size that stays near its high-water mark. Not glibc (musl, macOS, Windows):
    nothing to do.
    """
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # no confstr, or not glibc
        libc_version = ""
    if not libc_version.startswith("glibc"):
        return
    mallopt = ctypes.CDLL(None).mallopt
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 512 << 20)


def applies(reference: Mapping[str, np.ndarray]) -> bool:
    """Whether this model's pass runs in the kernel: float32, large, and the kernel builds."""
    if isinstance(reference, NpyViews):
        float32, size = reference.layout.float32, sum(reference.layout.counts)
    else:
        float32 = all(a.dtype == np.float32 for a in reference.values())
        size = sum(a.size for a in reference.values())
    return float32 and size >= MIN_PARAMS and library() is not None


def _in_place(
    arrays: Mapping[str, np.ndarray], names: tuple[str, ...], sizes: tuple[int, ...]
) -> Sequence[int] | None:
    """Addresses that npy bytes of exactly these float32 arrays know; None for other arrays.

    :class:`~sigmax_fl.codec.NpyViews` know them from their bytes; numpy is asked about others.
    """
    if (
        isinstance(arrays, NpyViews)
        and arrays.layout.float32
        and (arrays.layout.names, arrays.layout.counts) == (names, sizes)
    ):
        return arrays.addresses()
    return None


def _addresses(
    arrays: Mapping[str, np.ndarray],
    names: tuple[str, ...],
    sizes: tuple[int, ...],
    keep: list[np.ndarray],
) -> Sequence[int]:
    """Where each named array's float32 values start, once its size is checked.

    Arrays read in place from npy bytes (:class:`~sigmax_fl.codec.NpyViews`) of this layout
    say so themselves. Others are asked through numpy, C-ordered float32 as the kernel reads
    them: a no-op for such arrays, a copy into ``keep`` otherwise (e.g. a Fortran-order reply).
    """
    if (at := _in_place(arrays, names, sizes)) is not None:
        return at
    out = []
    for n, size in zip(names, sizes, strict=True):
        a = np.ascontiguousarray(arrays[n], dtype=np.float32)
        if a.size != size:
            raise ValueError(f"array '{n}': every model must have {size} values")
        keep.append(a)
        out.append(a.ctypes.data)
    return out


def _writable_addresses(
    out: Mapping[str, np.ndarray], names: tuple[str, ...], sizes: tuple[int, ...]
) -> Sequence[int]:
    """Where the kernel writes each named array: checked to be C-ordered float32 of its size."""
    writable = isinstance(out, NpyViews) and out.writable
    if writable and (in_place := _in_place(out, names, sizes)) is not None:
        return in_place
    at = []
    for n, size in zip(names, sizes, strict=True):
        a = out[n]
        if a.size != size:
            raise ValueError(f"array '{n}': out must have {size} values, like the reference")
        if a.dtype != np.float32 or not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(
                f"out['{n}'] must be writable C-ordered float32, got {a.dtype} "
                f"({'C' if a.flags.c_contiguous else 'not C'}-ordered"
                f"{'' if a.flags.writeable else ', read-only'})"
            )
        at.append(a.ctypes.data)
    return at


def norms_and_average(
    models: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    weights: Sequence[float],
    out: Mapping[str, np.ndarray],
    threads: int = THREADS,
) -> np.ndarray:
    """The update norms ``||models[k] - reference||``; the average goes into ``out``.

    ``out`` receives ``reference + sum_k weights[k] (models[k] - reference)``. Call only
    where :func:`applies`. ``threads`` threads take runs of tiles as they become free; the
    result depends neither on their number nor on which took what (each tile's sums have their
    own row).
    """
    kernel = library()
    if kernel is None:
        raise RuntimeError("fused.norms_and_average called where the kernel does not apply")
    names = tuple(reference)
    replies = len(models)
    # The C loop trusts every size it is given: check them all here.
    if replies == 0 or len(weights) != replies:
        raise ValueError(f"{replies} model(s) and {len(weights)} weight(s): need as many, >= 1")
    keep: list[np.ndarray] = []  # copies made here must outlive the call
    if isinstance(reference, NpyViews):
        sizes = reference.layout.counts
    else:
        sizes = tuple(reference[n].size for n in names)
    g_at = _addresses(reference, names, sizes, keep)
    x_at = [_addresses(m, names, sizes, keep) for m in models]
    arrays = len(names)
    # Every pointer the kernel takes, in one buffer: the replies array by array (reply k's
    # array a at a * replies + k), then the reference's arrays, then the result's.
    pointers = np.array(
        [
            *(at[a] for a in range(arrays) for at in x_at),
            *g_at,
            *_writable_addresses(out, names, sizes),
        ],
        dtype=np.uintp,
    )
    xs = pointers.ctypes.data
    gs = xs + pointers.itemsize * arrays * replies
    outs = gs + pointers.itemsize * arrays
    lens = np.array(sizes, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    tiles = sum((n + TILE - 1) // TILE for n in sizes)
    sq = np.zeros((tiles, replies), dtype=np.float64)
    args = (arrays, replies, xs, gs, outs, lens.ctypes.data, w.ctypes.data, sq.ctypes.data)
    parts = max(1, min(threads, tiles))
    # Runs of up to CHUNK tiles, and at least 8 runs a thread where there are enough tiles,
    # so that a small model is shared out too.
    chunk = max(1, min(CHUNK, tiles // (8 * parts)))
    started = kernel.sigmax_fused_threads(*args, tiles, chunk, parts)
    if started < parts - 1:  # the result is whole: the threads that ran took every tile
        log.warning(
            "fused aggregation pass: %d of %d thread(s) could not be started (a limit on "
            "threads or memory?); it ran on %d, more slowly",
            parts - 1 - started,
            parts,
            started + 1,
        )
    return np.sqrt(sq.sum(axis=0))
