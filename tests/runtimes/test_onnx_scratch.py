"""Scratch external data: arrays written as they are made read back exactly, in a saved model too, and the file goes."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from runtimes.onnx_export import write_models
from runtimes.onnx_scratch import ALIGN, ScratchData
from runtimes.quantize import initializer_array


def test_tensors_read_back_exactly_from_the_scratch_file_and_a_saved_model(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"codes": rng.integers(0, 255, (5, 3, 7), dtype=np.uint8),  # 105 bytes: the next one is padded
              "scales": rng.standard_normal(11).astype(np.float32),
              "rows": np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2]}  # not contiguous
    with ScratchData(tmp_path) as scratch:
        tensors = [scratch.tensor(array, name) for name, array in arrays.items()]
        assert scratch.path.parent == tmp_path and scratch.path.name.startswith(".scratch-")
        scratch.close()
        offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in tensors]
        assert offsets[0] == 0 and all(offset % ALIGN == 0 for offset in offsets) and offsets[1] >= 105
        for tensor, array in zip(tensors, arrays.values()):
            assert tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data  # not held in memory
            np.testing.assert_array_equal(initializer_array(tensor, tmp_path), array)
        graph = helper.make_graph(
            [helper.make_node("Identity", [name], [f"{name}_out"]) for name in arrays], "g", [],
            [helper.make_tensor_value_info(f"{name}_out", t.data_type, list(t.dims))
             for name, t in zip(arrays, tensors)], initializer=tensors)
        model = ir.serde.deserialize_model(helper.make_model(graph))
        ir.external_data.set_base_dir(model.graph, tmp_path)
        (tmp_path / "out").mkdir()
        path = write_models(model, tmp_path / "out" / "m.onnx", external_data=True)[0]
    assert not scratch.path.exists()  # removed on leaving, after the saved model copied what it needed
    saved = onnx.load(str(path))
    for tensor in saved.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), arrays[tensor.name])
