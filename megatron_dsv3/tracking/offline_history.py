"""Read an offline wandb run's history back without network.

wandb's Go core reads a run's .wandb file (for `wandb sync`), but the Python package installed here (0.31) has
no public reader for it: `wandb.Api` needs the server, and a local reader (`wandb.beta.LocalApi`, wandb pull
request #12745) is not in a release this project can require. A .wandb file is a leveldb-log framed stream of
wandb's own protobuf `Record`s, decoded here with wandb's protobuf classes; history rows are its `history`
records.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import time


def read_records(path: str) -> list:
    """Decode a .wandb file (leveldb-log framing of protobuf Records) without any network access. A file still
    being written ends in a partial record: only the complete ones are returned."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    block, pos, pending, payloads = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):  # wandb-core has not written this chunk out yet
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        rec = pb.Record()
        rec.ParseFromString(payload)
        records.append(rec)
    return records


def read_history(run_dir: str, timeout: float = 20.0) -> list[dict]:
    """History rows of a finished offline run; waits for the exit record since wandb-core writes asynchronously."""
    paths = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    if len(paths) != 1:
        raise ValueError(f"{run_dir}: expected one run-*.wandb file, found {len(paths)}")
    path = paths[0]
    deadline = time.monotonic() + timeout
    records = read_records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: the run never wrote its exit record")
        time.sleep(0.2)
        records = read_records(path)
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json) if item.value_json else None
        rows.append(row)
    return rows
