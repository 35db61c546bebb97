"""``python -m backbones`` (from ``examples/``): print every configuration and its size."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .factory import CONFIGS, HW2P2_NUM_CLASSES, PARAMETER_LIMIT, build, count_parameters


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backbones",
        description="List the backbone configurations with their parameter counts.",
    )
    parser.add_argument("--embedding-dim", type=int, default=512, help="embedding size (default 512)")
    parser.add_argument(
        "--num-classes", type=int, default=HW2P2_NUM_CLASSES,
        help=f"classes of the linear classifier counted with it (default {HW2P2_NUM_CLASSES}, HW2P2)",
    )
    args = parser.parse_args(argv)
    head = args.embedding_dim * args.num_classes
    print(f"{'name':<16} {'backbone':>11} {'+ classifier':>13}  description")
    for name, (description, _) in CONFIGS.items():
        params = count_parameters(build(name, args.embedding_dim))
        flag = "" if params + head <= PARAMETER_LIMIT else "  (over the 21M limit)"
        print(f"{name:<16} {params:>11,} {params + head:>13,}  {description}{flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
