"""Generate the gRPC stubs in pd/_generated/ from proto/*.proto.

    python -m pd.tools.gen_proto [--out DIR]

Runs grpc_tools.protoc (python, grpc and .pyi outputs), rewrites the generated modules'
absolute `import x_pb2 as ...` lines to package-relative imports, and writes the
package's __init__.py. The outputs are committed; tests/test_proto_stale.py fails
when they no longer match what this tool generates.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
DEFAULT_OUT = REPO_ROOT / "pd" / "_generated"
PROTOCOL_VERSION = 3

INIT_TEMPLATE = '''"""Generated gRPC stubs for the pd.v1 protocol.

Do not edit: run python -m pd.tools.gen_proto.
"""
from . import {modules}

PROTOCOL_VERSION = {version}

__all__ = [{names}, "PROTOCOL_VERSION"]
'''

_ABS_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    files = sorted(proto_dir.glob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files in {proto_dir}; run from a source checkout")
    return files


def run_protoc(out_dir: Path, proto_dir: Path = PROTO_DIR) -> None:
    from grpc_tools import protoc
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}"]
    args += [str(p) for p in proto_files(proto_dir)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_dir}; see the messages above")


def make_imports_relative(out_dir: Path) -> None:
    """`import prefill_pb2 as x` -> `from . import prefill_pb2 as x` for the modules
    generated here (google.protobuf imports are left alone)."""
    local = {p.stem for p in out_dir.glob("*_pb2.py")}

    def relative(match: re.Match) -> str:
        module, alias = match.groups()
        return f"from . import {module} as {alias}" if module in local else match.group(0)

    for path in sorted([*out_dir.glob("*_pb2*.py"), *out_dir.glob("*_pb2.pyi")]):
        path.write_text(_ABS_IMPORT.sub(relative, path.read_text()))


def write_init(out_dir: Path) -> None:
    modules = sorted(p.stem for p in out_dir.glob("*_pb2*.py"))
    (out_dir / "__init__.py").write_text(INIT_TEMPLATE.format(
        modules=", ".join(modules), version=PROTOCOL_VERSION,
        names=", ".join(f'"{m}"' for m in modules)))


def generate(out_dir: Path = DEFAULT_OUT, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Generate the stubs into out_dir; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_protoc(out_dir, proto_dir)
    make_imports_relative(out_dir)
    write_init(out_dir)
    return sorted(p for p in out_dir.iterdir() if p.suffix in (".py", ".pyi"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output package directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
