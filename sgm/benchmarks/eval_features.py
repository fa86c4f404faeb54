"""Time the Inception features of an evaluation: images/s of InceptionFeatures at a given image size.

    python -m sgm.benchmarks.eval_features --images 100 --size 256
    python -m sgm.benchmarks.eval_features --weights weights-inception-2015-12-05-6726825d.pth --device cuda

Without --weights a random-valued file in the standard format is written to a temporary folder:
the network and its cost are the same as with the published weights. Every image is resized to
299 x 299 inside the network, so the figure barely depends on --size. Prints one line, the median
of --repeats timed passes after one warm-up batch; an evaluation of N samples costs about
2 x N / (images/s) for FID against a cached reference set (the generated images' features plus
nothing for the reference), plus the sampling itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from sgm.eval.inception import InceptionFeatures, MissingWeightsError, write_random_weights


def images_per_second(
    extractor: InceptionFeatures, images: torch.Tensor, repeats: int, device: torch.device
) -> list[float]:
    """Images/s of `repeats` passes over `images` (after one warm-up batch), synchronising on CUDA."""
    extractor(images[: extractor.batch_size])
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        extractor(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(images.shape[0] / (time.perf_counter() - start))
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; one line of results, or one line of error and exit 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="images per timed pass")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (the model's sample size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--weights", help="Inception weights file (default: random weights, same cost)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if min(args.images, args.size, args.batch_size, args.repeats) < 1:
        print("error: --images, --size, --batch-size and --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            weights = args.weights or write_random_weights(Path(scratch) / "inception-random.pth")
            extractor = InceptionFeatures(weights, option="--weights", batch_size=args.batch_size).to(device)
        except (MissingWeightsError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
    rates = images_per_second(extractor, images.to(device), args.repeats, device)
    rate = statistics.median(rates)
    print(
        f"inception features: {rate:.2f} images/s ({args.images} images at {args.size} px, batch {args.batch_size}, "
        f"{device}, {torch.get_num_threads()} threads; {args.images / rate:.1f} s per pass)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
