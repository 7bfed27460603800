"""Training and inference throughput of candidate CNN shapes on this CPU (synthetic inputs).

Used to size the shipped network for a 2-core machine: it must train in <= 30 minutes.

    uv run python benchmarks/train_throughput.py [--images 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

# (input side, stage widths): the shipped shape first, then the alternatives we weighed.
CANDIDATES = [
    (128, (32, 64, 128)),
    (96, (32, 64, 128)),
    (160, (32, 64, 128)),
    (128, (32, 64, 128, 192)),
    (128, (48, 96, 192)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="images per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per candidate")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from brainmri.training import build_model
    from brainmri.training.trainer import augment_batch

    print(f"{'input':>6} {'widths':>18} {'params':>9} {'train img/s':>12} {'infer ms (1 img)':>17}")
    rng = np.random.default_rng(0)
    for size, widths in CANDIDATES:
        keras.utils.set_random_seed(0)
        x = rng.random((args.images, size, size, 1), dtype=np.float32)
        y = rng.integers(0, 4, args.images)
        data = (tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
                .map(lambda a, b: (augment_batch(a), b)).prefetch(2))
        model = build_model(size, widths)
        model.compile(keras.optimizers.AdamW(1e-3), "sparse_categorical_crossentropy")
        model.fit(data.take(2), verbose=0)  # trace and allocate
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.fit(data, verbose=0)
            rates.append(args.images / (time.perf_counter() - t0))
        infer = tf.function(lambda a: model(a, training=False))
        one = x[:1]
        infer(one)
        times = []
        for _ in range(100):
            t0 = time.perf_counter()
            infer(one)
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"{size:>6} {str(widths):>18} {model.count_params():>9,} "
              f"{statistics.median(rates):>12.0f} {statistics.median(times):>17.2f}")


if __name__ == "__main__":
    main()
