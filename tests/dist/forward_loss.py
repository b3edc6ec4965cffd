"""torchrun worker: forward + backward of the tiny preset under TP/EP; writes the loss and a few grad norms."""
import json
import os
import sys

import torch

import megatron_dsv3 as m


def main(out_dir: str, tp: int, ep: int) -> None:
    m.runtime.initialize(tp=tp, ep=ep, seed=1234)
    cfg = m.presets.get_preset("tiny").replace(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    model = m.build_model(cfg, backend="local")
    torch.manual_seed(5)  # same tokens on every rank
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    loss = model(ids, torch.arange(32).expand(2, 32), None, labels=torch.roll(ids, -1, 1)).mean()
    loss.backward()
    embedding_grad = model.embedding.word_embeddings.weight.grad.norm().item()
    rank = torch.distributed.get_rank()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"loss": loss.item(), "embedding_grad_norm_shard": embedding_grad}, f)
    m.runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
