"""Generate keyd/v1 and keyd/notary/wire (Python, .pyi stubs, gRPC stubs) from proto/.

Run through `./dev.sh proto`; tests/test_proto_fresh.py runs it into a
temporary directory and fails when the committed code differs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["keyd/v1/keyd.proto", "keyd/notary/wire/signer.proto"]


def generate(out: Path) -> None:
    # protoc finds the mypy-protobuf plugins (protoc-gen-mypy*) on PATH: the venv's bin.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
