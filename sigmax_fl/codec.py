"""Lighter train replies: an instance sends its update as a float16 or int8 delta.

``update-encoding = "float32"`` sends the trained weights as they are. ``"float16"`` and
``"int8"`` send the delta ``local - received global`` instead, which is small and centred on 0
and so survives coarse number formats far better than the weights themselves:

* float16: the delta cast to half precision (2 bytes per value);
* int8: the delta in blocks of :data:`BLOCK` consecutive values of one tensor, each block
  scaled to [-127, 127] by its own float32 scale ``max |delta| / 127`` (1 + 4 / 256 bytes per
  value), so one large weight does not flatten the resolution of a whole tensor.

Error feedback: what the encoding loses (the residual ``delta - decoded``) stays on the
instance, on its own disk (:mod:`sigmax_fl.kept`, so a resumed run has it too), and is added to
its next delta. The error therefore does not accumulate over rounds: each round's sent updates
sum to the true updates up to the one residual still held back, which is bounded by one round's
quantisation step.

The server decodes a reply back to full weights (``global + delta``, float32) before
screening, so norm bounds, caps, robust rules and DP see ordinary models; a reply that does not
decode (missing scales, wrong dtypes or shapes) is a :class:`MalformedUpdateError` and is rejected.
"""

from __future__ import annotations

import ctypes
import functools
import io
import math
import platform
from collections.abc import Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

ENCODINGS = ("float32", "float16", "int8")
BLOCK = 256
"""Values per int8 scale: 4 / 256 = 1.6 % overhead, and a scale per 1 KiB of float32 weights."""
SCALE_SUFFIX = ":scale"
"""An int8 tensor ``name`` travels as ``name`` (int8, the tensor's shape) and ``name:scale``."""
ENCODING_KEY = "update-encoding"
"""Key of the reply's meta ConfigRecord declaring the encoding; absent means float32 weights."""
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class MalformedUpdateError(ValueError):
    """An encoded reply that cannot be decoded against the global model it answers."""


def as_numpy(array: Array) -> np.ndarray:
    """A read-only view of an Array's npy bytes, without the copy ``Array.numpy()`` makes.

    The view points into ``array.data``: a server reads every reply's weights in place. The
    common case (the header ``np.save`` writes for the Array's declared dtype and shape) is
    recognised by comparing bytes with a cached header, not by parsing it, which costs more
    than reading a million weights.
    """
    data = array.data
    expected = _declared(array.dtype, tuple(array.shape))
    if expected is not None:
        header, dtype, shape, count = expected
        if len(data) == len(header) + count * dtype.itemsize and data.startswith(header):
            return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape)
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not model weights")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=1024)
def _declared(
    dtype_name: str, shape: tuple[int, ...]
) -> tuple[bytes, np.dtype, tuple[int, ...], int] | None:
    """Header, dtype, shape and size of an Array so declared; None for no plain numpy dtype."""
    try:
        dtype = np.dtype(dtype_name)
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        return None
    if dtype.hasobject:
        return None
    header = _npy_header(np.lib.format.dtype_to_descr(dtype), shape)
    return header, dtype, shape, math.prod(shape)


@functools.lru_cache(maxsize=1024)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The npy header (version 1.0) ``np.save`` writes for a C-ordered array."""
    stream = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue()


def npy_array(values: np.ndarray, dtype: np.dtype | str | None = None) -> Array:
    """``Array(values.astype(dtype))``, the same npy bytes, with one copy instead of several.

    ``np.save`` into a BytesIO (what ``Array(ndarray)`` does) copies in chunks and grows its
    buffer; here the bytes are the cached header and the values, joined once.
    """
    values = np.asarray(values)
    values = values.astype(values.dtype if dtype is None else dtype, order="C", copy=False)
    header = _npy_header(np.lib.format.dtype_to_descr(values.dtype), values.shape)
    body = memoryview(values.reshape(-1)).cast("B") if values.size else b""
    data = b"".join([header, body])
    return Array(dtype=str(values.dtype), shape=values.shape, stype="numpy.ndarray", data=data)


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytes.restype = ctypes.py_object
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.argtypes = (ctypes.py_object,)
_bytes_address.restype = ctypes.c_void_p


def _bytes_offset() -> int | None:
    """How far past ``id(data)`` a bytes object's first byte lies; None where ``id`` is no address.

    In CPython ``id`` is the object's address and the bytes follow a fixed header
    (``PyBytesObject.ob_sval``), so one probe measures the offset for every bytes object.
    """
    if platform.python_implementation() != "CPython":
        return None
    probe = b"npy"
    return _bytes_address(probe) - id(probe)


_BYTES_OFFSET = _bytes_offset()


def bytes_address(data: bytes) -> int:
    """Address of the first byte of ``data``, which must stay alive while it is used.

    ``id`` plus a fixed offset costs 0.1 µs; the C API through ctypes costs 0.9 µs, and numpy
    (``view.ctypes.data``) 3 µs: for the 80 arrays of a 10-reply round, a few per cent of an
    aggregation pass over a million parameters.
    """
    if _BYTES_OFFSET is None or type(data) is not bytes:
        return _bytes_address(data)
    return id(data) + _BYTES_OFFSET


class NpyLayout:
    """A model's array names, declared dtypes and shapes, and the npy headers they imply.

    Worked out once a round from the model that was sent, so that each reply is recognised
    as that model's layout by comparing strings and lengths (:meth:`views`) instead of asking
    Flower and numpy about each array anew: at 10 replies of 8 arrays, that asking cost more
    than half a millisecond, a third of an aggregation pass over a million parameters.
    """

    def __init__(
        self, names: tuple[str, ...], dtypes: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]
    ) -> None:
        declared = [_declared(d, s) for d, s in zip(dtypes, shapes, strict=True)]
        if any(d is None for d in declared):
            raise ValueError("an array does not declare a plain numpy dtype")
        self.names = names
        self.dtypes = dtypes
        self.shapes = tuple(d[2] for d in declared)
        self.headers = tuple(d[0] for d in declared)
        self.np_dtypes = tuple(d[1] for d in declared)
        self.counts = tuple(d[3] for d in declared)
        self.payload_sizes = tuple(
            len(h) + n * t.itemsize
            for h, n, t in zip(self.headers, self.counts, self.np_dtypes, strict=True)
        )
        self.float32 = all(t == np.float32 for t in self.np_dtypes)
        self.record_bytes = sum(self.payload_sizes) + sum(len(name) for name in names)
        """``ArrayRecord.count_bytes()`` of a record of this layout: its bytes and its names."""
        self.index = {name: i for i, name in enumerate(names)}

    @classmethod
    def of(cls, arrays: Mapping[str, Array]) -> NpyLayout | None:
        """The layout of these arrays; None if one of them declares no plain numpy dtype."""
        values = list(arrays.values())
        try:
            dtypes = tuple(a.dtype for a in values)
            return cls(tuple(arrays), dtypes, tuple(tuple(a.shape) for a in values))
        except ValueError:
            return None

    def views(self, record: ArrayRecord) -> NpyViews | None:
        """The record's arrays in place, if it has exactly this layout; None otherwise.

        Exactly: the same names in the same order, each Array declaring the same dtype and
        shape, and its bytes the header ``np.save`` writes for them followed by just as many
        values. Anything else (also a valid npy array in Fortran order) is left to the
        caller's slower checks, which say what is wrong.
        """
        if tuple(record.keys()) != self.names:
            return None
        payloads = []
        for array, dtype, shape, header, size in zip(
            record.values(),
            self.dtypes,
            self.shapes,
            self.headers,
            self.payload_sizes,
            strict=True,
        ):
            data = array.data
            if (
                array.dtype != dtype
                or tuple(array.shape) != shape
                or type(data) is not bytes
                or len(data) != size
                or not data.startswith(header)
            ):
                return None
            payloads.append(data)
        return NpyViews(self, payloads)


class NpyViews(Mapping[str, np.ndarray]):
    """Arrays lying in npy bytes, one numpy view each, made when first asked for.

    The aggregation kernel needs only where each array's values start (:meth:`addresses`),
    which is known from the bytes themselves; numpy views cost 1.5 µs each and are only made
    where something reads an array (the careful screening path, robust rules, tests). Views
    are read-only unless ``writable``, which only the maker of the bytes may ask for
    (:class:`FreshArrays`).
    """

    def __init__(self, layout: NpyLayout, payloads: list[bytes], writable: bool = False) -> None:
        """Views of ``payloads``, npy payloads of ``layout`` to the byte.

        Made only by :meth:`NpyLayout.views`, which has just checked each payload, and by
        :class:`FreshArrays`, which made them: the aggregation kernel trusts :meth:`addresses`.
        """
        self.layout = layout
        self.writable = writable
        self._payloads = payloads
        self._starts = tuple(
            bytes_address(data) + len(header)
            for data, header in zip(payloads, layout.headers, strict=True)
        )
        self._views: dict[str, np.ndarray] = {}

    def seal(self) -> None:
        """No more writing: the bytes are about to be shared (:meth:`FreshArrays.record`)."""
        self.writable = False
        for view in self._views.values():
            view.flags.writeable = False

    def addresses(self) -> tuple[int, ...]:
        """Where each array's first value lies, in :attr:`NpyLayout.names` order."""
        return self._starts

    def __getitem__(self, name: str) -> np.ndarray:
        view = self._views.get(name)
        if view is None:
            i, layout = self.layout.index[name], self.layout
            data, header, dtype, count = (
                self._payloads[i],
                layout.headers[i],
                layout.np_dtypes[i],
                layout.counts[i],
            )
            if self.writable:
                buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(self._starts[i])
                buffer.keep = data  # the view (whose base is this buffer) keeps the bytes alive
                flat = np.frombuffer(buffer, dtype, count)
            else:
                flat = np.frombuffer(data, dtype, count, len(header))
            view = self._views[name] = flat.reshape(layout.shapes[i])
        return view

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.names)

    def __len__(self) -> int:
        return len(self.layout.names)


class FreshArrays:
    """npy bytes for new float32 arrays, written in place, then handed to Flower.

    An Array holds immutable ``bytes``, so building one from computed values copies them
    (:func:`npy_array`): at 10M parameters one more 40 MB pass. Here the bytes are made first,
    uninitialised, the C API's own way of building a bytes object
    (``PyBytes_FromStringAndSize(NULL, n)``, then fill it), and the values are computed
    straight into them. The contract: every value is written through :attr:`values` before
    :meth:`record` shares the bytes, and nothing writes to them afterwards.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]] | NpyLayout) -> None:
        """Arrays of these shapes, or of a float32 layout's (the model that was sent)."""
        if isinstance(shapes, NpyLayout):
            if not shapes.float32:
                raise ValueError("FreshArrays holds float32 arrays; this layout has others")
            layout = shapes
        else:
            names = tuple(shapes)
            shape_list = tuple(tuple(shape) for shape in shapes.values())
            layout = NpyLayout(names, ("float32",) * len(names), shape_list)
        payloads = []
        for header, size in zip(layout.headers, layout.payload_sizes, strict=True):
            data = _new_bytes(None, size)
            ctypes.memmove(bytes_address(data), header, len(header))
            payloads.append(data)
        self._payloads = payloads
        self.layout = layout
        self.values = NpyViews(layout, payloads, writable=True)
        """Writable float32 views of each array's values (each keeps its bytes alive)."""

    def record(self) -> ArrayRecord:
        """The arrays, as they were written; the views, also any held elsewhere, turn read-only."""
        self.values.seal()
        # Item by item: ArrayRecord(dict) would build every Array a second time.
        record = ArrayRecord()
        layout = self.layout
        for name, shape, data in zip(layout.names, layout.shapes, self._payloads, strict=True):
            record[name] = Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=data)
        return record


def _int8_blocks(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``delta`` (float32) as int8 values and one float32 scale per :data:`BLOCK` values."""
    flat = delta.reshape(-1)
    padded = np.zeros(-(-flat.size // BLOCK) * BLOCK, dtype=np.float32)
    padded[: flat.size] = flat
    blocks = padded.reshape(-1, BLOCK)
    scale = (np.abs(blocks).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))[:, None]
    q = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8)
    return q.reshape(-1)[: flat.size].reshape(delta.shape), scale


def _int8_values(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 delta an int8 tensor and its scales stand for."""
    flat = q.reshape(-1)
    padded = np.zeros(scale.size * BLOCK, dtype=np.float32)
    padded[: flat.size] = flat
    return (padded.reshape(-1, BLOCK) * scale[:, None]).reshape(-1)[: flat.size].reshape(q.shape)


def encode_update(
    local: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    encoding: str,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """The reply's arrays for ``encoding`` and the residual to keep for the next round.

    Parameters
    ----------
    local : Mapping[str, np.ndarray]
        The instance's trained weights (float32), in the order the server sent them.
    received : Mapping[str, np.ndarray]
        The global model this round started from, with the same names and shapes.
    encoding : str
        One of :data:`ENCODINGS`; ``float32`` sends ``local`` unchanged and keeps no residual.
    residual : Mapping[str, np.ndarray], optional
        What the previous round's encoding lost; ignored unless its names and shapes match.

    Returns
    -------
    tuple[ArrayRecord, dict[str, np.ndarray]]
        The arrays to send, and ``delta + residual - decoded``, the new residual.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"update encoding '{encoding}': expected one of {list(ENCODINGS)}")
    if encoding == "float32":
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in local.items()}), {}
    usable = residual is not None and all(
        k in residual and residual[k].shape == np.shape(v) for k, v in local.items()
    )
    arrays: dict[str, Array] = {}
    left: dict[str, np.ndarray] = {}
    for name, weights in local.items():
        delta = np.asarray(weights, dtype=np.float32) - np.asarray(received[name], np.float32)
        if usable:
            delta = delta + residual[name]  # type: ignore[index]
        if encoding == "float16":
            half = np.clip(delta, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
            arrays[name] = Array(half)
            left[name] = delta - half.astype(np.float32)
        else:
            q, scale = _int8_blocks(delta)
            arrays[name] = Array(q)
            arrays[name + SCALE_SUFFIX] = Array(scale)
            left[name] = delta - _int8_values(q, scale)
    return ArrayRecord(arrays), left


def decode_update(
    record: ArrayRecord, reference: Mapping[str, np.ndarray], encoding: str
) -> dict[str, np.ndarray]:
    """Full float32 weights ``reference + delta`` from an encoded reply.

    Raises
    ------
    MalformedUpdateError
        Naming the first array that is missing, extra, of the wrong dtype or shape, not a
        readable npy array, or (int8) whose scales are negative or not finite.
    """
    if encoding not in ENCODINGS[1:]:
        raise MalformedUpdateError(
            f"unknown update encoding {encoding!r}, expected one of {list(ENCODINGS[1:])}"
        )
    names = list(reference)
    expected = (
        names
        if encoding == "float16"
        else [k for name in names for k in (name, name + SCALE_SUFFIX)]
    )
    if list(record.keys()) != expected:
        missing = sorted(set(expected) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(expected))
        raise MalformedUpdateError(
            f"{encoding} arrays differ from the global model's (missing {missing}, extra {extra})"
        )
    dtype = np.dtype(encoding)
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        values = _read(record, name, dtype, ref.shape)
        if encoding == "float16":
            delta = values.astype(np.float32)
        else:
            blocks = -(-ref.size // BLOCK)
            scale = _read(record, name + SCALE_SUFFIX, np.dtype(np.float32), (blocks,))
            if not (np.isfinite(scale).all() and (scale >= 0).all()):
                raise MalformedUpdateError(
                    f"array '{name}{SCALE_SUFFIX}' holds a negative, NaN or Inf scale"
                )
            delta = _int8_values(values, scale)
        out[name] = np.add(ref, delta, dtype=np.float32).astype(ref.dtype, copy=False)
    return out


def _read(record: ArrayRecord, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """One array of an encoded reply, checked against the dtype and shape it must have."""
    got = record[name]
    try:
        declared = np.dtype(got.dtype)
    except (TypeError, ValueError):
        declared = None  # a dtype name numpy does not know: as wrong as any other
    if declared != dtype or tuple(got.shape) != tuple(shape):
        raise MalformedUpdateError(
            f"array '{name}' is {got.dtype}{list(got.shape)}, expected {dtype}{list(shape)}"
        )
    try:
        view = as_numpy(got)
    except ValueError as err:
        raise MalformedUpdateError(f"array '{name}' is not a readable npy array ({err})") from None
    if view.dtype != dtype or view.shape != tuple(shape):
        raise MalformedUpdateError(
            f"array '{name}': npy content disagrees with its declared dtype/shape"
        )
    return view
