"""Benchmark: every attribution method on the built-in organism (the demo's pipeline), with wall times.

Prints precision@k, PR-AUC, ROC-AUC and the mean rank of hard negatives for TF-IDF similarity (baseline), Vector
Filter, Projection Difference, Concept Influence (EKFAC) and classical influence, and writes a JSON summary.

    python bench/methods_organism.py [--out runs/bench-methods] [--seed 0] [--n-train 2000] [--planted-fraction 0.1]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from concept_influence.demo import DemoConfig, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-methods"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--planted-fraction", type=float, default=0.1)
    parser.add_argument("--query-samples", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    run_demo(
        args.out,
        DemoConfig(
            seed=args.seed,
            n_train=args.n_train,
            planted_fraction=args.planted_fraction,
            query_samples=args.query_samples,
        ),
    )


if __name__ == "__main__":
    main()
