"""A rollout server's weight-sync side in its own process, for the multi-process tests.

It serves the real WeightSync service over the real TransformersBackend (the tiny model), prints
`port <n>` once listening, then answers commands on stdin, one per line:
  dump <path>   write the weights it serves now to a safetensors file, then print `dumped`
  quit          stop
"""
import argparse
import sys

from safetensors.torch import save_file

from mmupt.config import ModelSettings
from mmupt.services.rollout.hf_backend import TransformersBackend
from mmupt.services.rollout.weight_server import WeightSyncServicer, start_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args()
    backend = TransformersBackend(ModelSettings(path=args.model, device="cpu"))
    servicer = WeightSyncServicer(backend, args.token, args.run_id)
    server, port = start_server(servicer, "127.0.0.1", 0)
    print(f"port {port}", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "dump":
            save_file({k: v.contiguous() for k, v in backend.state_dict().items()}, arg)
            print("dumped", flush=True)
        elif command == "quit":
            break
    servicer.close()
    server.stop(0)


if __name__ == "__main__":
    main()
