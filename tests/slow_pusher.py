"""A pusher in its own process that streams slowly, so that a test can kill it mid-stream.

usage: slow_pusher.py ADDRESS TOKEN RUN_ID MODEL_DIR VERSION
It pushes the tiny model's weights + 1 as VERSION in 1 KiB chunks, prints `streaming` once a few
chunks are out, then sends one chunk every 50 ms.
"""
import sys
import time

import grpc

from mmupt._proto import weights_pb2_grpc as pb_grpc
from mmupt.config import ModelSettings
from mmupt.model import load_model
from mmupt.weights import build_manifest, push_messages


def slowly(messages):
    for i, message in enumerate(messages):
        yield message
        if i == 5:
            print("streaming", flush=True)
        if i >= 5:
            time.sleep(0.05)


def main() -> None:
    address, token, run_id, model_dir, version = sys.argv[1:6]
    state = {k: v + 1 for k, v in load_model(ModelSettings(path=model_dir, device="cpu")).state_dict().items()}
    manifest, payload = build_manifest(state, int(version), run_id)
    stub = pb_grpc.WeightSyncStub(grpc.insecure_channel(address))
    stub.Push(slowly(push_messages(manifest, payload, 1024)), metadata=(("authorization", f"Bearer {token}"),),
              timeout=600)


if __name__ == "__main__":
    main()
