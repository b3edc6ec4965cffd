"""Greedy MTP speculative decoding: the MTP module drafts the tokens after next, the main model verifies.

Position bookkeeping (n = tokens already in the main cache; t_n is the last emitted, not yet cached, token):
  draft   d_1 = argmax MTP(h_{n-1}, emb(t_n))        -- MTP has its own latent cache of (h_i, t_{i+1}) pairs
          d_j = argmax MTP(x_{j-1}, emb(d_{j-1}))     -- chained (j = 2..k): the module's own output x stands in
                                                        for the main model's hidden at the next position
  verify  main model over [t_n, d_1 .. d_k] at positions n .. n+k (one forward, with the cache)
          g_j = argmax logits(n + j); the drafts are accepted while d_{j+1} == g_j, so a accepted drafts emit
          a + 1 tokens (g_0 .. g_a) for this step; positions past n + a leave the main cache, and the chained
          MTP entries leave the MTP cache, which then gets the true pairs (h_{n+j}, g_j).
The emitted tokens are therefore always the main model's own greedy choices: the output equals plain
greedy decoding, only the number of main-model forwards changes.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from megatron_dsv3.inference.generate import GenerationOutput, InferenceEngine, as_batch, decoding


FALLBACK_WINDOW = 16  # verification steps judged at a time
DEFAULT_DRAFT_TOKENS = 4  # chained drafts per main step (the `make run` model: 3.9 tokens a step, 1.55x greedy)


@decoding
def speculative_generate(engine: InferenceEngine, prompt, max_new_tokens: int, *,
                         eos_id: Optional[int] = None, draft_tokens: int = DEFAULT_DRAFT_TOKENS,
                         min_acceptance: float = 0.35,
                         draft_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> GenerationOutput:
    """Greedy generation of one prompt with `draft_tokens` MTP drafts per main-model step (the first MTP module,
    chained past the first; fewer near the end, none past the last token asked for); stats add acceptance_rate
    and tokens_per_main_step.

    When the first draft was accepted in fewer than `min_acceptance` of the last 16 steps, drafting stops and
    the rest is decoded plainly (a draft costs an MTP step and a wider verification; below that rate it does
    not pay). `draft_hook(position, draft)` may replace the MTP draft for sequence position `position` (tests
    use it to force accept/reject patterns); the output must not depend on it, only the step count does."""
    if not engine.mtp_layers:
        raise ValueError("--speculative: the model has no MTP module (num_nextn_predict_layers = 0)")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"--draft-tokens: expected an integer >= 1, got {draft_tokens!r}")
    k = draft_tokens
    ids = as_batch(prompt).to(engine.device)
    if ids.shape[0] != 1:
        raise ValueError("speculative decoding takes one prompt at a time (batch 1)")
    p = ids.shape[1]
    if p + max_new_tokens > engine.capacity:  # as greedy: no draft goes past the last token asked for
        raise ValueError(f"max_new_tokens: prompt ({p}) + {max_new_tokens} exceeds the cache capacity "
                         f"{engine.capacity}")
    main, mtp = engine.new_cache(1), engine.new_cache(1, mtp=True)
    t0 = time.perf_counter()
    logits, hidden = engine.forward(ids, main)
    t_prefill = time.perf_counter() - t0
    main_steps = 1
    cur_id = logits[:, -1:].argmax(-1)                  # t_P, [1, 1]: ids stay tensors, ints only to compare
    out = [int(cur_id)]
    # MTP over the prompt: (h_i, t_{i+1}) for i = 0..P-1, the last pair drafts t_{P+1}.
    pend_hidden, pend_next = hidden, torch.cat([ids[:, 1:], cur_id], dim=1)
    accepted = verify_steps = drafted = 0
    recent: list[bool] = []
    fell_back_at = None

    def finished() -> bool:
        return len(out) >= max_new_tokens or (eos_id is not None and out[-1] == eos_id)

    t1 = time.perf_counter()
    while not finished() and fell_back_at is None:
        n = main.length
        drafts_now = min(k, max_new_tokens - len(out) - 1)  # none past the last token asked for
        draft_ids: list[torch.Tensor] = []              # [1, 1] each
        if drafts_now:
            step_logits, x = engine.mtp_forward(pend_hidden, pend_next, mtp, last_only=True, with_hidden=True)
            committed = mtp.length
            for j in range(drafts_now):
                if j:
                    step_logits, x = engine.mtp_forward(x, draft_ids[-1], mtp, with_hidden=True)
                d = step_logits.argmax(-1)             # [1, 1]: a draft call returns the last position only
                if draft_hook is not None:
                    d = torch.as_tensor(draft_hook(n + 1 + j, d.view(())), dtype=torch.long).view(1, 1)
                draft_ids.append(d)
            mtp.truncate(committed)                    # chained entries stood on drafts, not the main model
        step_ids = torch.cat([cur_id, *draft_ids], dim=1)
        logits, hidden = engine.forward(step_ids, main)
        main_steps += 1
        verify_steps += 1
        drafted += drafts_now
        choice_ids = logits.argmax(-1)                 # greedy choices at positions n .. n+drafts, [1, drafts + 1]
        g, drafts = choice_ids[0].tolist(), step_ids[0, 1:].tolist()
        a = 0
        while a < drafts_now and g[a] == drafts[a]:
            a += 1
        accepted += a
        main.truncate(n + a + 1)
        cur_id = choice_ids[:, a : a + 1]
        pend_hidden, pend_next = hidden[: a + 1], choice_ids[:, : a + 1]
        for t in g[: a + 1]:
            if not finished():
                out.append(t)
        if drafts_now:
            recent = (recent + [a > 0])[-FALLBACK_WINDOW:]
        if len(recent) == FALLBACK_WINDOW and sum(recent) < min_acceptance * FALLBACK_WINDOW:
            fell_back_at = len(out)
    while not finished():                              # plain greedy decoding from here
        logits, _ = engine.forward(cur_id, main)
        main_steps += 1
        cur_id = logits[:, -1:].argmax(-1)
        out.append(int(cur_id))
    t_decode = time.perf_counter() - t1
    n_new = len(out)
    verified = (n_new if fell_back_at is None else fell_back_at) - 1  # tokens the verification steps emitted
    stats = {
        "mode": "speculative",
        "prompt_tokens": p, "new_tokens": n_new, "batch": 1,
        "main_model_steps": main_steps,  # prefill + verification forwards + plain steps after a fall-back
        "tokens_per_main_step": n_new / main_steps,
        "draft_tokens": k, "verify_steps": verify_steps, "drafted": drafted, "accepted_drafts": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "fell_back_to_plain_at": fell_back_at, "plain_steps": main_steps - 1 - verify_steps,
        "tokens_per_verify_step": verified / verify_steps if verify_steps else 0.0,
        "prefill_s": t_prefill, "decode_s": t_decode,
        "tokens_per_s": n_new / max(t_prefill + t_decode, 1e-9),
        "cache_bytes_per_token": main.bytes_per_token(),
        "mtp_cache_bytes_per_token": mtp.bytes_per_token(),
        "cache_values_per_token_per_layer": main.values_per_token_per_layer(),
        "standard_kv_bytes_per_token": engine.standard_kv_bytes_per_token(),
    }
    return GenerationOutput(torch.tensor([out], dtype=torch.long), stats)
