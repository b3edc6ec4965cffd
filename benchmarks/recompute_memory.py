"""Activation memory with and without selective recompute, and AdamW state bytes with FP32 vs BF16 moments.

    python benchmarks/recompute_memory.py [--preset small] [--seq-length 512] [--micro-batch-size 2]

Activation memory is measured, not estimated: every tensor autograd saves for the backward is recorded during
one forward, and the bytes of their distinct storages still allocated when the forward ends are summed
(weights excluded; what recompute discards is freed by then). The report's recompute choice is
`--recompute-modules layernorm mla_up_proj moe_act` (RMSNorm, the MLA up-projections, the MoE activation).
Optimizer state: megatron-core's AdamW (torch's on CPU) after one step, its exp_avg/exp_avg_sq in FP32, next to
the same moments held in BF16 as `--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16`
keeps them (Transformer Engine's FusedAdam; not runnable without CUDA, so those bytes are of BF16 copies of
the measured moments). Prints one JSON line per measurement and the ratios.
"""
from __future__ import annotations

import argparse
import json

import torch

REPORT_MODULES = ["layernorm", "mla_up_proj", "moe_act"]


def saved_activation_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the activations one forward keeps for the backward (distinct live storages, weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids, positions, None, labels=torch.roll(ids, -1, 1))
    storages = {}
    for tensor in saved:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
    del loss
    return sum(storages.values())


def optimizer_state_bytes(model) -> dict[str, int]:
    """AdamW moments after one step: measured in FP32, and the same moments as BF16 tensors."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    optimizer.step()
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")]
    return {"fp32_moments": sum(t.nbytes for t in moments),
            "bf16_moments": sum(t.to(torch.bfloat16).nbytes for t in moments),
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    import megatron_dsv3 as m

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    args = parser.parse_args()
    m.runtime.initialize()
    cfg = m.presets.get_preset(args.preset)
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, args.seq_length),
                        generator=torch.Generator().manual_seed(0))
    activations = {}
    for name, mcore in {"no_recompute": {}, "selective_recompute": dict(
            recompute_granularity="selective", recompute_modules=REPORT_MODULES)}.items():
        model = m.build_model(cfg, backend="local", moe_grouped_gemm=True, **mcore)
        activations[name] = saved_activation_bytes(model, ids)
        print(json.dumps({"measure": "activation_bytes", "setting": name, "bytes": activations[name],
                          "preset": args.preset, "tokens": ids.numel()}))
    states = optimizer_state_bytes(model)
    print(json.dumps({"measure": "optimizer_state_bytes", **states}))
    print(json.dumps({"activation_ratio_selective_over_none": activations["selective_recompute"]
                      / activations["no_recompute"],
                      "moment_ratio_bf16_over_fp32": states["bf16_moments"] / states["fp32_moments"]}))


if __name__ == "__main__":
    main()
