"""Generate the Python stubs for protos/ into service/tiw_facade/_proto (or check they are current).

Usage: python scripts/gen_protos.py [--check]

grpcio-tools writes imports as if the proto package were a top-level Python package
(`from tiw.v20190919 import tiw_pb2`); we keep the stubs inside our own import package, so every
import of one of our protos' modules is rewritten to point there: in the *_pb2_grpc.py modules (their
messages) and in the *_pb2.py and *_pb2.pyi modules of a proto importing another of ours
(tiw/facade/v1/watcher.proto imports tiw.proto). Imports of other protos (google.protobuf) stay.
--check regenerates into a temporary folder and fails when the committed stubs differ from what the
protos make.
"""

from __future__ import annotations

import filecmp
import importlib.resources
import pathlib
import re
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "service" / "tiw_facade" / "_proto"
PACKAGE_PREFIX = "tiw_facade._proto."


def generate(into: pathlib.Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    # grpc_tools ships the well-known types (google/protobuf/timestamp.proto) beside protoc.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={into}",
        f"--pyi_out={into}",
        f"--grpc_python_out={into}",
    ]
    if protoc.main([*args, *sources]) != 0:
        raise SystemExit("protoc failed")
    packages = {str(pathlib.PurePosixPath(source).parent).replace("/", ".") for source in sources}
    for module in (p for pattern in ("*_pb2_grpc.py", "*_pb2.py", "*_pb2.pyi") for p in into.rglob(pattern)):
        text = module.read_text()
        for package in sorted(packages):
            # At the start of a line only: never inside a longer name (`from x.tiw.v20190919 import`).
            pattern = rf"^from {re.escape(package)} import"
            text = re.sub(pattern, f"from {PACKAGE_PREFIX}{package} import", text, flags=re.MULTILINE)
        module.write_text(text)
    for folder in [into, *(p for p in into.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def tree(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        fresh = pathlib.Path(tmp)
        generate(fresh)
        if check:
            stale = sorted(
                name
                for name in tree(fresh) | tree(OUT)
                if not (OUT / name).exists()
                or not (fresh / name).exists()
                or not filecmp.cmp(fresh / name, OUT / name, shallow=False)
            )
            if stale:
                print(
                    "generated stubs differ from protos/; run: python scripts/gen_protos.py", file=sys.stderr
                )
                print("\n".join(f"  {name}" for name in stale), file=sys.stderr)
                return 1
            print("generated stubs are current")
            return 0
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(fresh, OUT)
    print(f"wrote stubs to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
