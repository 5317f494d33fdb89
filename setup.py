"""Build hook: generate the gRPC stubs from proto/*.proto whenever the package is built or installed
(also `pip install -e .`). The generated modules land in mmupt/_proto/, which git ignores, so nobody
edits them by hand."""
import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "mmupt" / "_proto"


def generate_stubs() -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject [build-system])

    for proto in sorted(PROTO_DIR.glob("*.proto")):
        args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={OUT_DIR}", f"--grpc_python_out={OUT_DIR}", str(proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        # protoc writes `import weights_pb2 as ...`; inside a package it must be relative.
        grpc_module = OUT_DIR / f"{proto.stem}_pb2_grpc.py"
        text = grpc_module.read_text()
        grpc_module.write_text(re.sub(rf"^import {proto.stem}_pb2 as", f"from . import {proto.stem}_pb2 as", text, flags=re.M))


class BuildPyWithProtos(build_py):
    def run(self):
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
