"""Regenerates the gRPC stubs under src/coresdk/v1 from ../../proto.

The stubs are committed so that installing the package needs no code generation; the test
suite regenerates them into a temporary directory and fails when the committed ones are stale.
"""
import sys
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "coresdk" / "v1").glob("*.proto"))
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *files,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")
    for package in (out / "coresdk", out / "coresdk" / "v1"):
        (package / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "src")
