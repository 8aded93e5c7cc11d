"""Streaming safetensors I/O for checkpoints larger than memory allows to hold twice.

The `safetensors` library maps whole files and writes whole dicts; loading a model whose experts must
be stacked into [E, ...] arrays through it holds file pages and a stacked copy at once. Here a tensor
is read with ``readinto`` straight into its slot of a preallocated array (no mmap, no intermediate
copy), and written one tensor at a time. The format (an 8-byte little-endian header length, a JSON
header of {name: {dtype, shape, data_offsets}}, then raw little-endian bytes) is checked on read:
offsets inside the file, sizes matching shape and dtype.
"""

from __future__ import annotations

import ctypes
import json
import pathlib
import struct
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),  # block-FP8 checkpoints (with their scales)
}
CODES = {v: k for k, v in DTYPES.items()}


class TensorInfo:
    """Where one tensor lives: file, byte offset, dtype code, shape."""

    def __init__(self, path: pathlib.Path, name: str, entry: dict, data_start: int, file_size: int):
        self.path, self.name = path, name
        _check_entry(path, name, entry)
        self.code, self.shape = entry["dtype"], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        self.offset, self.nbytes = data_start + begin, end - begin
        if not 0 <= begin <= end or self.offset + self.nbytes > file_size:
            raise ValueError(
                f"{path}: tensor {name!r} has data offsets {entry['data_offsets']} outside the file"
            )
        if self.code in DTYPES:
            want = int(np.prod(self.shape)) * DTYPES[self.code].itemsize
            if want != self.nbytes:
                raise ValueError(
                    f"{path}: tensor {name!r} {self.code}{list(self.shape)} needs {want} bytes, "
                    f"has {self.nbytes}"
                )

    @property
    def dtype(self) -> np.dtype:
        if self.code not in DTYPES:
            raise ValueError(
                f"{self.path}: tensor {self.name!r} has dtype {self.code}, which ktjax cannot load "
                f"(supported: {sorted(DTYPES)})"
            )
        return DTYPES[self.code]


def _check_entry(path: pathlib.Path, name: str, entry: object) -> None:
    """A header entry is {"dtype": str, "shape": [int >= 0, ...], "data_offsets": [int, int]}."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: header entry is {type(entry).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise ValueError(f"{where}: header entry has no {key!r}")
    is_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(entry["dtype"], str):
        raise ValueError(f"{where}: dtype {entry['dtype']!r} is not a string")
    if not isinstance(entry["shape"], list) or not all(map(is_count, entry["shape"])):
        raise ValueError(f"{where}: shape {entry['shape']!r} is not a list of non-negative integers")
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_count, offsets)):
        raise ValueError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")


# The longest JSON header read, as the safetensors format's reference reader caps it: a corrupt length
# field must not make the loader read a whole file into memory before finding the JSON broken.
MAX_HEADER_BYTES = 100_000_000


def read_header(path: str | pathlib.Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for one .safetensors file."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n} > file size)")
        if n > MAX_HEADER_BYTES:
            raise ValueError(
                f"{path}: corrupt safetensors header (declared length {n} bytes, more than the format's "
                f"limit of {MAX_HEADER_BYTES})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(
            f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)"
        )
    header.pop("__metadata__", None)
    return {name: TensorInfo(path, name, entry, 8 + n, size) for name, entry in header.items()}


def read_into(info: TensorInfo, out: np.ndarray) -> None:
    """Reads `info`'s tensor into `out` (C-contiguous, same number of elements), converting the dtype
    if they differ (through a temporary the size of this one tensor)."""
    if out.size != int(np.prod(info.shape)):
        raise ValueError(f"tensor {info.name!r} has shape {list(info.shape)}, expected {list(out.shape)}")
    if info.code == "F8_E4M3" and out.dtype != info.dtype:
        raise ValueError(
            f"{info.path}: FP8 tensor {info.name!r} cannot be converted without its block scales"
        )
    direct = out.dtype == info.dtype
    buf = out if direct else np.empty(info.shape, info.dtype)
    with info.path.open("rb") as f:
        f.seek(info.offset)
        got = f.readinto(memoryview(buf.reshape(-1).view(np.uint8)))
    if got != info.nbytes:
        raise ValueError(f"{info.path}: tensor {info.name!r} truncated ({got} of {info.nbytes} bytes)")
    if not direct:
        out[...] = buf.reshape(out.shape).astype(out.dtype)


def write_file(
    path: str | pathlib.Path, tensors: Iterable[tuple[str, np.ndarray]], names_shapes: dict
) -> None:
    """Writes (name, array) pairs one at a time. `names_shapes` maps each name to (dtype, shape) so the
    header can be written first; arrays are cast to that dtype as they are written."""
    header, offset = {}, 0
    for name, (dtype, shape) in names_shapes.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": CODES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with pathlib.Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, array in tensors:
            dtype, shape = names_shapes[name]
            array = np.ascontiguousarray(np.asarray(array).astype(dtype, copy=False))
            if array.shape != tuple(shape):
                raise ValueError(
                    f"tensor {name!r}: shape {array.shape} differs from the header's {tuple(shape)}"
                )
            f.write(memoryview(array.reshape(-1).view(np.uint8)))


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("byte_offset", ctypes.c_uint64),
    ]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_DL_UINT, _DL_BFLOAT = 1, 4


class _Bfloat16View:
    """Exports a uint16 numpy array through DLPack as bfloat16 (numpy's DLPack knows no bfloat16)."""

    def __init__(self, bits: np.ndarray):
        self.bits = bits

    def __dlpack_device__(self):
        return self.bits.__dlpack_device__()

    def __dlpack__(self, **kwargs):
        capsule = self.bits.__dlpack__()
        tensor = _DLTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
        if (tensor.dtype.code, tensor.dtype.bits) != (_DL_UINT, 16):
            raise BufferError("expected a uint16 DLPack tensor")
        tensor.dtype.code = _DL_BFLOAT
        return capsule


def to_jax(array: np.ndarray) -> jax.Array:
    """A jax CPU array sharing `array`'s memory where possible (64-byte aligned, C-contiguous, a
    DLPack dtype or bfloat16), else a copy. Sharing keeps a loaded checkpoint in memory once."""
    try:
        if array.ctypes.data % 64 or not array.flags.c_contiguous or array.size == 0:
            raise BufferError("not shareable")
        if array.dtype == DTYPES["BF16"]:
            return jax.dlpack.from_dlpack(_Bfloat16View(array.view(np.uint16)))
        return jax.dlpack.from_dlpack(array)
    except (BufferError, TypeError, RuntimeError):
        return jnp.asarray(array)
