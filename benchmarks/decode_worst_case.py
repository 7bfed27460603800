"""Hunt for slow inputs to the decode path: mutate small PNG/JPEG/DICOM files, time each decode.

A crash fuzz (tests/test_fuzz_decode.py) only fails on errors and hangs; an input that takes
seconds to reject is a cheap way to burn a worker's CPU, so this prints the slowest ones.
Seeded and bounded in time:

    uv run python benchmarks/decode_worst_case.py --seconds 120 --seed 1

It found a PNG whose IDAT length had one flipped bit (4 GB declared in a 2 KB file): OpenCV
took 4.9 s to give up. The chunk walk in brainmri.imaging now refuses it in microseconds.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fuzz seeds and header mutations

from test_fuzz_decode import _INTERESTING_32  # noqa: E402
from test_fuzz_decode import SEEDS  # noqa: E402
from test_fuzz_decode import _png_tweak  # noqa: E402

from brainmri.imaging import load_scan  # noqa: E402


def mutate(rng: random.Random, seed: str) -> bytes:
    """A seed file with, for PNGs, one IHDR field set to a boundary value, then a few byte flips."""
    data = bytearray(SEEDS[seed])
    if seed.startswith("png") and rng.random() < 0.6:
        _png_tweak(data, rng.randrange(7), rng.choice(_INTERESTING_32), rng.random() < 0.7)
    for _ in range(rng.choice([0, 1, 2, 4, 8])):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--show", type=int, default=5, help="how many of the slowest to print")
    parser.add_argument("--save", type=Path, help="write the slowest input here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    worst: list[tuple[float, str, str, bytes]] = []
    count, deadline = 0, time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        seed = rng.choice(sorted(SEEDS))
        data = mutate(rng, seed)
        start = time.perf_counter()
        try:
            load_scan(data, 128)
            outcome = "decoded"
        except Exception as exc:  # noqa: BLE001 - the outcome's type is what we report
            outcome = getattr(exc, "code", type(exc).__name__)
        worst.append((time.perf_counter() - start, seed, outcome, data))
        worst = sorted(worst, key=lambda item: -item[0])[: args.show]
        count += 1
    print(f"{count:,} mutated inputs in {args.seconds:.0f} s (seed {args.seed}); slowest:")
    for seconds, seed, outcome, data in worst:
        print(f"  {seconds * 1e3:8.1f} ms  {seed:<12} {outcome:<16} {len(data):,} bytes")
    if args.save and worst:
        args.save.write_bytes(worst[0][3])


if __name__ == "__main__":
    main()
