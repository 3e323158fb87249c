"""Run keyd's benchmarks: python -m benchmarks [--runs N] [--seconds S] [--only PART ...]."""

from __future__ import annotations

import argparse

from benchmarks import core

PARTS = ("rpc", "store", "verify", "pkcs11", "notary", "access", "yubikey")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median taken)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per run")
    parser.add_argument(
        "--only", nargs="*", choices=PARTS, default=list(PARTS), help="parts to run (default all)"
    )
    args = parser.parse_args()
    core.run(args.runs, args.seconds, args.only).print()


if __name__ == "__main__":
    main()
