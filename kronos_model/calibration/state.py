"""Arrays in a JSON-able state: exact (every bit of a float64 survives) and checked on the way back in."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

_DTYPES = {"float64": np.dtype("<f8"), "int64": np.dtype("<i8"), "bool": np.dtype("bool")}


def pack(array: np.ndarray) -> dict[str, Any]:
    """{"dtype", "shape", "data": base64 of the little-endian bytes}: about 11 characters per float64."""
    array = np.asarray(array)
    name = "bool" if array.dtype == np.bool_ else "int64" if array.dtype.kind in "iu" else "float64"
    data = np.ascontiguousarray(array, dtype=_DTYPES[name]).tobytes()
    return {"dtype": name, "shape": list(array.shape), "data": base64.b64encode(data).decode("ascii")}


def unpack(packed: Any, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The array back, or ValueError naming `name` if it is not what the state should hold."""
    if not isinstance(packed, dict) or set(packed) != {"dtype", "shape", "data"}:
        raise ValueError(f"calibration state: {name} is not a packed array")
    if packed["dtype"] != dtype:
        raise ValueError(f"calibration state: {name} has dtype {packed['dtype']!r}, expected {dtype!r}")
    if list(packed["shape"]) != list(shape):
        raise ValueError(f"calibration state: {name} has shape {packed['shape']}, expected {list(shape)}")
    try:
        raw = base64.b64decode(packed["data"], validate=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"calibration state: {name} is not valid base64") from exc
    expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
    if len(raw) != expected:
        raise ValueError(f"calibration state: {name} holds {len(raw)} bytes, expected {expected}")
    return np.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape).astype(_DTYPES[dtype].newbyteorder("="))
