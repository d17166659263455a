"""A sharded checkpoint's index against its shards: `model.safetensors.index.json`.

Published checkpoints keep their weights in `model-0000N-of-0000M.safetensors` files listed by
the index's weight_map (tensor name -> file). Run by the config hook at start-up, before the
tensor checks of checkpoint.py (which read every shard's header): a shard the index names but
the directory lacks, or a tensor the index places in a shard whose header does not have it, is
ONE KimiLinearCheckpointError naming the file, instead of a "tensor missing" about its tensors
or a loader failure in a worker. Only headers are read.
"""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import KimiLinearCheckpointError

INDEX_FILE = "model.safetensors.index.json"


def _header_names(path: Path) -> set[str]:
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise KimiLinearCheckpointError(
            f"Kimi Linear checkpoint: {path} is not a readable safetensors file ({e}): "
            "download it again") from None
    return set(header) - {"__metadata__"}


def check_index(model_dir) -> None:
    """The index (if any) names only shards that exist, and each of its tensors is in the shard
    it names. Directories without an index (single-file checkpoints, hub ids) pass."""
    d = Path(model_dir)
    index = d / INDEX_FILE
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise KimiLinearCheckpointError(
            f"Kimi Linear checkpoint: {index} is not a safetensors index (a JSON object with a "
            "'weight_map' of tensor name -> shard file): download it again") from None
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    for fname in sorted(by_file):
        shard = d / fname
        if not shard.is_file():
            raise KimiLinearCheckpointError(
                f"Kimi Linear checkpoint: shard {shard} is missing: {INDEX_FILE} lists "
                f"{len(by_file[fname])} tensors in it (e.g. {sorted(by_file[fname])[0]}); the "
                "download is incomplete, fetch that file")
        absent = sorted(set(by_file[fname]) - _header_names(shard))
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise KimiLinearCheckpointError(
                f"Kimi Linear checkpoint: tensor {absent[0]}{more} is listed in {INDEX_FILE} as "
                f"stored in {shard}, but that file does not contain it: the shard and the index "
                "are from different exports; download both again")
