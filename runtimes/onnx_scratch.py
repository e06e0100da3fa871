"""New initializers written to a scratch file as they are made, so they need not all be in memory at once.

A step that makes one large tensor per layer of an ONNX model (the low-bit codes the int4 writers of
``quantize.py`` and ``quantize_head.py`` make) would otherwise hold every one of them until the model is saved: half a
byte a weight at 4 bits, about 35 GB for a 70B model by count. ``ScratchData`` appends each array to a file in the folder the model's external data locations are relative
to, and returns an initializer that points at its bytes there; ``onnx_export.write_models`` then copies it into the
output's data file one tensor at a time, as it does the float weights. The file is removed on leaving the context.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

ALIGN = 64  # each tensor starts on a multiple of this many bytes


class ScratchData:
    """A scratch external data file in ``folder``; ``tensor`` writes an array to it and returns its initializer."""

    def __init__(self, folder: str | Path):
        fd, path = tempfile.mkstemp(dir=folder, prefix=".scratch-", suffix=".data")
        self.path = Path(path)
        self._file = os.fdopen(fd, "wb")
        self._offset = 0

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """An initializer ``name`` holding ``array``, its bytes appended to the scratch file (not kept in memory)."""
        array = np.ascontiguousarray(array)
        pad = -self._offset % ALIGN
        self._file.write(b"\0" * pad)
        self._offset += pad
        self._file.write(array.data)
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", self._offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self._offset += array.nbytes
        return tensor

    def close(self) -> None:
        """Flush the file, so the tensors written so far can be read from it."""
        self._file.close()

    def __enter__(self) -> ScratchData:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
