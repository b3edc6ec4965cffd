"""torchrun worker (2 ranks, EP=2): load a converted checkpoint into expert-parallel shards and save it again."""
import json
import sys
from pathlib import Path

import torch

import megatron_dsv3 as m
from megatron_dsv3.checkpoint.dist import load_checkpoint, save_checkpoint
from megatron_dsv3.checkpoint.hf import config_from_hf


def main(out_dir: str, src: str, work: str) -> None:
    work = Path(work)
    m.runtime.initialize(tp=1, pp=1, ep=2)
    hf_config = json.loads((Path(src) / "config.json").read_text())
    model = m.build_model(config_from_hf(hf_config).replace(expert_model_parallel_size=2))
    load_checkpoint(work / "ckpt", [model], load_rng=False)
    experts = len(model.decoder.layers[1].mlp.experts.local_experts)
    save_checkpoint(work / "trained", 3, [model])
    rank = torch.distributed.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"loaded_experts": experts}))
    m.runtime.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
