"""Regenerate the Python stubs (and their mypy stubs) in managed_agents/v1/ from protos/.

Usage: python scripts/gen_protos.py [--check]
With --check nothing is written: the stubs are generated into a temporary directory and compared with the
committed ones, and the exit code is 1 if they differ (CI uses this to catch stale generated code).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("managed_agents") / "v1"
INIT_TEXT = '"""Generated protobuf and gRPC stubs of the managed_agents.v1 contracts. @generated"""\n'


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    path = scripts / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise SystemExit(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
        path = Path(found)
    return str(path)


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    (out_dir / PACKAGE_DIR / "__init__.py").write_text(INIT_TEXT)
    (out_dir / PACKAGE_DIR / "py.typed").write_text("")


def _differences(fresh: Path, committed: Path) -> list[str]:
    names = {p.name for p in fresh.iterdir()} | ({p.name for p in committed.iterdir()} if committed.exists() else set())
    changed = []
    for name in sorted(names):
        a, b = fresh / name, committed / name
        if name == "__pycache__":
            continue
        if not a.exists() or not b.exists() or not filecmp.cmp(a, b, shallow=False):
            changed.append(str(PACKAGE_DIR / name))
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / PACKAGE_DIR).mkdir(parents=True)
        generate(out)
        committed = ROOT / PACKAGE_DIR
        changed = _differences(out / PACKAGE_DIR, committed)
        if args.check:
            if changed:
                print("generated code is stale; run `make protos` and commit:", *changed, sep="\n  ")
                return 1
            print("generated code is up to date")
            return 0
        for stale in committed.glob("*_pb2*"):
            stale.unlink()
        committed.mkdir(parents=True, exist_ok=True)
        for item in (out / PACKAGE_DIR).iterdir():
            shutil.copy2(item, committed / item.name)
        print(f"regenerated {len(list(committed.glob('*_pb2*.py')))} modules in {PACKAGE_DIR}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
