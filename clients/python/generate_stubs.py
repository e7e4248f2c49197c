"""Regenerates the gRPC stubs under src/coresdk/v1 from ../../proto, and the packaged copy of
the sidecar's built-in rules (src/coresdk/default_rules.toml) from ../../rules/default.toml.

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
    (out / "coresdk" / "v1" / "__init__.py").touch()
    # The mock reads the sidecar's own built-in rules, shipped inside the package.
    (out / "coresdk" / "default_rules.toml").write_bytes((PROTO_ROOT.parent / "rules" / "default.toml").read_bytes())


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "src")
