"""One member of weight-sync broadcast groups in its own process, for the collective tests.

usage: collective_peer.py STORE_PORT MANIFEST_FILE BUCKET_BYTES TIMEOUT_S ROUND [ROUND ...]

MANIFEST_FILE holds a serialized Manifest (protobuf). Each ROUND is `group_id:rank:world_size`, or
`group_id:rank:world_size:hang` to join that group and then never take part (a hung peer). For each
round it prints one line (after `ready` once connected): `ok <checksum of the verified bytes>`, `error <reason>` or `hung`.
"""
import sys
import time

import torch

from mmupt._proto import weights_pb2 as pb
from mmupt.collective import BroadcastGroup, CollectiveError, connect_store, receive_flat, run_with_deadline
from mmupt.weights import StagedPush, WeightSyncError, flat_offsets


def main() -> None:
    port, manifest_file, bucket_bytes, timeout_s = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    manifest = pb.Manifest.FromString(open(manifest_file, "rb").read())
    store = connect_store("127.0.0.1", port, timeout_s)
    print("ready", flush=True)
    for round_spec in sys.argv[5:]:
        group_id, rank, world_size, *mode = round_spec.split(":")
        if mode == ["hang"]:  # join (the others wait for every rank), then never take part
            group = BroadcastGroup(store, group_id, int(rank), int(world_size), "gloo", timeout_s)
            print("hung", flush=True)
            time.sleep(10 * timeout_s)
            del group
            continue
        staged = StagedPush(manifest, torch.empty(flat_offsets(manifest.tensors)[1], dtype=torch.uint8))
        holder = {}

        def receive():
            holder["group"] = BroadcastGroup(store, group_id, int(rank), int(world_size), "gloo", timeout_s)
            return receive_flat(holder["group"], staged, bucket_bytes)

        try:
            checksum = run_with_deadline(receive, timeout_s, f"round {group_id}",
                                         lambda: holder["group"].abort() if "group" in holder else None)
            staged.finish(checksum)
            print(f"ok {checksum}", flush=True)
        except (CollectiveError, WeightSyncError) as exc:
            print("error " + str(exc)[:200].replace("\n", " "), flush=True)
            if "group" in holder:
                holder["group"].abort()

if __name__ == "__main__":
    main()
