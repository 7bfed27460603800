"""The Keras EfficientNet-Lite0 with converted weights gives PyTorch's outputs (slow).

The reference logits were recorded with PyTorch by experiments/verify_lite0_conversion.py on
fixed inputs; here the same inputs go through the Keras port built from the .pth with the
torch-free reader, so CI needs no torch. With torch installed, a second test compares live.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from brainmri.config import PROJECT_ROOT

from experiments.verify_lite0_conversion import fixed_inputs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "lite0_torch_logits.json"
# float32 through 50 convolutions and batch norms, summed in a different order by oneDNN and
# PyTorch: measured max |difference| 9.3e-6 on logits up to 5.7. 1e-3 leaves room for other
# CPUs and still catches a wrong transpose, padding or epsilon by orders of magnitude.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def converted():
    """The ImageNet Lite0 in Keras with the package's weights, and the state dict."""
    from brainmri.training import lite0
    from brainmri.training.pth_reader import read_state_dict

    state = read_state_dict(lite0.imagenet_weights_path())
    model = lite0.build_imagenet(224)
    lite0.load_imagenet_weights(model, state)
    return model, state


def test_converted_network_matches_recorded_pytorch_logits(converted):
    """Same logits (within TOLERANCE) and the same top-5 classes as PyTorch on fixed inputs."""
    model, _ = converted
    reference = json.loads(FIXTURE.read_text())
    expected = np.array(reference["logits"], np.float32)
    logits = model.predict(fixed_inputs(), verbose=0)
    assert logits.shape == expected.shape == (3, 1000)
    assert np.abs(logits - expected).max() < TOLERANCE
    assert [np.argsort(-row)[:5].tolist() for row in logits] == reference["top5"]


def test_live_pytorch_agrees(converted):
    """With torch installed (not a project dependency), compare against PyTorch directly."""
    torch = pytest.importorskip("torch", reason="torch is optional: see experiments/verify_lite0_conversion.py")
    from experiments.verify_lite0_conversion import build_torch_lite0
    from brainmri.training.lite0 import imagenet_weights_path

    model, _ = converted
    reference = build_torch_lite0()
    reference.load_state_dict(torch.load(imagenet_weights_path(), weights_only=True), strict=True)
    reference.eval()
    x = fixed_inputs(seed=7)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    assert np.abs(model.predict(x, verbose=0) - expected).max() < TOLERANCE


def test_every_tensor_is_used_exactly_once(converted):
    """A missing or extra tensor is an error, never a silent partial load."""
    from brainmri.training import lite0

    _, state = converted
    model = lite0.build_imagenet(224)
    broken = dict(state)
    broken.pop("_blocks.3._depthwise_conv.weight")
    with pytest.raises(ValueError, match="no tensor '_blocks.3._depthwise_conv.weight'"):
        lite0.load_imagenet_weights(model, broken)
    extra = {**state, "_blocks.99._se_reduce.weight": np.zeros(1, np.float32)}
    with pytest.raises(ValueError, match="were not used"):
        lite0.load_imagenet_weights(model, extra)


def test_classifier_starts_from_the_imagenet_backbone(converted):
    """`--weights imagenet-lite0` puts the same backbone weights under the 4-class head."""
    from brainmri.training import lite0

    imagenet, _ = converted
    model = lite0.build_classifier(size=64, weights="imagenet-lite0")
    for name in ("stem_conv", "block7_dwconv", "head_bn"):
        for a, b in zip(model.get_layer(name).get_weights(), imagenet.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)


def test_reader_refuses_code_in_a_pickle(tmp_path):
    """A .pth whose pickle names any other global (here os.system) is refused, not run."""
    from brainmri.training.pth_reader import PthError
    from brainmri.training.pth_reader import read_state_dict

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo owned",))

    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, Evil()):
            pickle.dump(part, handle, protocol=2)
    with pytest.raises(PthError, match="Refusing to load"):
        read_state_dict(path)


def _write_legacy_pth(path, tensors, storage=np.arange(6, dtype=np.float32), monkeypatch=None):
    """A minimal torch legacy-format file built without torch: fake torch globals in sys.modules."""
    import collections
    import struct
    import sys
    import types

    torch_module, utils_module = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    torch_module.FloatStorage = FloatStorage

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils_module._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch_module)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_module)

    class Storage:
        pass

    class Tensor:
        def __init__(self, offset, size, stride):
            self.args = (offset, size, stride)

        def __reduce__(self):
            return (_rebuild_tensor_v2, (the_storage, *self.args, False, collections.OrderedDict()))

    the_storage = Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is the_storage:
                return ("storage", FloatStorage, "0", "cpu", storage.size)
            return None

    state = collections.OrderedDict((name, Tensor(*args)) for name, args in tensors.items())
    with path.open("wb") as handle:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(part, handle, protocol=2)
        Pickler(handle, protocol=2).dump(state)
        pickle.dump(["0"], handle, protocol=2)
        handle.write(struct.pack("<q", storage.size) + storage.tobytes())
    return path


def test_reader_reads_a_handmade_legacy_file(tmp_path, monkeypatch):
    """The fake-torch writer is faithful: in-bounds views (incl. a transpose) read back exactly."""
    from brainmri.training.pth_reader import read_state_dict

    path = _write_legacy_pth(tmp_path / "ok.pth", {"w": (0, (2, 3), (3, 1)), "t": (0, (3, 2), (1, 3)),
                                                   "b": (4, (2,), (1,))}, monkeypatch=monkeypatch)
    state = read_state_dict(path)
    flat = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(state["w"], flat.reshape(2, 3))
    np.testing.assert_array_equal(state["t"], flat.reshape(2, 3).T)
    np.testing.assert_array_equal(state["b"], flat[4:6])


@pytest.mark.parametrize("offset, size, stride", [
    (0, (2, 4), (4, 1)),        # 8 elements from a storage of 6
    (5, (2,), (1,)),            # starts inside, runs past the end
    (0, (2, 3), (3, 1000000)),  # a huge stride: far outside the buffer
    (0, (2, 3), (-3, 1)),       # a negative stride reads before the buffer
    (-1, (2,), (1,)),           # a negative offset
    (0, (2, 3), (3,)),          # stride and shape disagree
])
def test_reader_refuses_views_outside_their_storage(tmp_path, monkeypatch, offset, size, stride):
    """A crafted offset, size or stride is refused instead of reading memory outside the file."""
    from brainmri.training.pth_reader import PthError
    from brainmri.training.pth_reader import read_state_dict

    path = _write_legacy_pth(tmp_path / "oob.pth", {"w": (offset, size, stride)}, monkeypatch=monkeypatch)
    with pytest.raises(PthError):
        read_state_dict(path)


@pytest.mark.parametrize("position", ["magic", "protocol", "sys_info", "keys"])
def test_reader_refuses_code_in_any_pickle_of_the_chain(tmp_path, position):
    """Every pickle of the legacy chain, not only the state dict, goes through the restricted unpickler."""
    import subprocess
    import sys

    from brainmri.training.pth_reader import PthError
    from brainmri.training.pth_reader import read_state_dict

    marker = tmp_path / "owned"

    class Evil:
        def __reduce__(self):
            return (subprocess.call, ([sys.executable, "-c", f"open({str(marker)!r}, 'w')"],))

    parts = {"magic": 0x1950A86A20F9469CFC6C, "protocol": 1001,
             "sys_info": {"little_endian": True}, "state": {}, "keys": []}
    parts[position] = Evil()
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        for part in parts.values():
            pickle.dump(part, handle, protocol=2)
    with pytest.raises(PthError):
        read_state_dict(path)
    assert not marker.exists()


def test_reader_refuses_a_missing_storage(tmp_path, monkeypatch):
    """A tensor naming a storage whose bytes are absent is a PthError, not a KeyError."""
    import struct

    from brainmri.training.pth_reader import PthError
    from brainmri.training.pth_reader import read_state_dict

    path = _write_legacy_pth(tmp_path / "ok.pth", {"w": (0, (2,), (1,))}, monkeypatch=monkeypatch)
    data = path.read_bytes()
    storage_bytes = struct.pack("<q", 6) + np.arange(6, dtype=np.float32).tobytes()
    keys_pickle = pickle.dumps(["0"], protocol=2)
    truncated = data[: -len(storage_bytes) - len(keys_pickle)] + pickle.dumps([], protocol=2)
    path.write_bytes(truncated)
    with pytest.raises(PthError, match="storage"):
        read_state_dict(path)
    path.write_bytes(data[:-8])  # storage bytes cut short
    with pytest.raises(PthError, match="truncated"):
        read_state_dict(path)
