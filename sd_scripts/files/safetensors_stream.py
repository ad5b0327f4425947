"""Read and write .safetensors files one tensor at a time, for models too big to hold twice (a 12B FLUX.1).

:class:`SafetensorsReader` reads the header (keys, dtypes, shapes, metadata) and then each tensor with a plain
``read`` into its own buffer. ``safetensors.safe_open`` maps the whole file, and every page it has read stays in the
process's resident memory until the file is closed (measured: a 0.8 GB file read tensor by tensor shows 0.8 GB of
resident file pages), so a merge over a 24 GB model would look like it holds the model; here only the tensor being
worked on is in memory.

:class:`SafetensorsWriter` writes the header first (every key's dtype and shape is known before any data: a merge
keeps the shapes) and then the tensors in the header's order, into a temporary file that replaces the destination
only when complete (:func:`sd_scripts.files.atomic.atomic_write`). The layout is the one ``safetensors`` writes:
header padded with spaces to 8 bytes, tensors ordered by decreasing element size then name, so each starts aligned.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from sd_scripts.files.atomic import atomic_write

__all__ = ["DTYPE_NAMES", "LazyStateDict", "SafetensorsReader", "SafetensorsWriter", "TensorInfo", "dtype_of_name"]

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_MAX_HEADER = 100_000_000


def dtype_of_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name!r}")
    return _DTYPES[name]


class TensorInfo:
    __slots__ = ("key", "dtype", "shape", "start", "end")

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int):
        self.key, self.dtype, self.shape, self.start, self.end = key, dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsReader:
    """``with SafetensorsReader(path) as r: r.keys(), r.info(key), r.read(key), r.metadata``.

    Raises ValueError for a file that is not a safetensors file."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            raw = self._file.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise ValueError("header too large")
            header = json.loads(self._file.read(length))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            self._file.close()
            raise ValueError(f"{self.path} is not a readable .safetensors file ({e})") from None
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self._base = 8 + length
        self._infos: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            start, end = entry["data_offsets"]
            self._infos[key] = TensorInfo(key, dtype_of_name(entry["dtype"]), tuple(int(s) for s in entry["shape"]),
                                          int(start), int(end))

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: i.shape for k, i in self._infos.items()}

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, in a buffer of its own (nothing else of the file stays in memory)."""
        info = self._infos[key]
        buffer = bytearray(info.nbytes)
        self._file.seek(self._base + info.start)
        view = memoryview(buffer)
        done = 0
        while done < info.nbytes:
            n = self._file.readinto(view[done:])
            if not n:
                raise ValueError(f"{self.path} is truncated (tensor {key})")
            done += n
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._infos:
            yield key, self.read(key)


class SafetensorsWriter:
    """Write ``entries`` (``(key, dtype, shape)``) as a safetensors file, tensors given one by one in :attr:`order`.

    ``with SafetensorsWriter(path, entries, metadata) as w: for key in w.order: w.write(key, tensor)``; the file
    appears at ``path`` only when every tensor was written and the block ended without an exception."""

    def __init__(self, path, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        ordered = sorted(entries, key=lambda e: (-torch.empty((), dtype=e[1]).element_size(), e[0]))
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._expected: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for key, dtype, shape in ordered:
            shape = tuple(int(s) for s in shape)
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected[key] = (dtype, shape, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._header = struct.pack("<Q", len(raw)) + raw
        self.order = [e[0] for e in ordered]
        self._next = 0
        self._stack = contextlib.ExitStack()
        self._file = None

    def __enter__(self) -> SafetensorsWriter:
        self._file = self._stack.enter_context(atomic_write(self.path, "wb"))
        self._file.write(self._header)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self._next != len(self.order):
            missing = self.order[self._next]
            err = ValueError(f"{self.path}: tensor {missing} was not written")
            self._stack.__exit__(type(err), err, None)
            raise err
        return self._stack.__exit__(exc_type, exc, tb)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != key:
            want = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ValueError(f"tensors must be written in order: got {key}, expected {want}")
        dtype, shape, nbytes = self._expected[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{key}: got {tensor.dtype} {tuple(tensor.shape)}, the header says {dtype} {shape}")
        if nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._file.write(memoryview(data.numpy()))
        self._next += 1


class LazyStateDict(Mapping):
    """A read-only state dict over a .safetensors file: each tensor is read when it is looked up, nothing is kept.
    ``shapes()`` gives every key's shape from the header."""

    def __init__(self, path):
        self._reader = SafetensorsReader(path)
        self.metadata = self._reader.metadata

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._reader:
            raise KeyError(key)
        return self._reader.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader.keys())

    def __len__(self) -> int:
        return len(self._reader)

    def __contains__(self, key) -> bool:
        return key in self._reader

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._reader.shapes()

    def close(self) -> None:
        self._reader.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self._reader.close()
