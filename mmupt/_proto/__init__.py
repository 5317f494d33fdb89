"""gRPC stubs generated from proto/*.proto by setup.py at build/install time (not in git)."""
try:
    from . import weights_pb2, weights_pb2_grpc  # noqa: F401
except ImportError as exc:  # a source checkout that was never installed
    raise ImportError("gRPC stubs are missing: run `pip install -e .` to generate them from proto/") from exc
