"""How long measuring a model's geometry takes, over the test zoo (``tests/zoo.py``).

Prints, per method (``analytic``: the interval pass over torch.export's ATen graph;
``probe``: gradient probe, for graphs the pass cannot read), the number of models and the
min / median / max seconds of :func:`tilefcn.measure.measure` (export + analysis + the tiling
check), and the seconds a refusal takes. One torch thread, as the tests run.

    python benchmarks/bench_measure.py
    python benchmarks/bench_measure.py --no-verify   # the analysis alone (no tiling check)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the tiling check of analytic geometries")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import torch
    from zoo import ZOO

    from tilefcn.measure import in_channels_of, measure

    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"analytic": [], "probe": [], "refused": []}
    for entry in ZOO:
        model = entry.make()
        t0 = time.perf_counter()
        try:
            c = in_channels_of(model)
            result = measure(model, c, verify=not args.no_verify)
        except ValueError:
            times["refused"].append(time.perf_counter() - t0)
            continue
        times[result.method].append(time.perf_counter() - t0)
    print(f"zoo: {len(ZOO)} models; seconds per model (in_channels + measure"
          f"{', no tiling check' if args.no_verify else ''}):")
    for method, values in times.items():
        if values:
            print(f"  {method:9s} n={len(values):3d}  min {min(values):.2f}  median "
                  f"{statistics.median(values):.2f}  max {max(values):.2f}")


if __name__ == "__main__":
    main()
