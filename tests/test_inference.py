"""Inference: absorbed MLA latent cache vs full recomputation, cache layout, MTP drafts, speculative == greedy,
seeded sampling, and the dsv3-generate CLI on a briefly trained checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

import megatron_dsv3 as m
from megatron_dsv3.checkpoint.dist import load_checkpoint
from megatron_dsv3.inference import InferenceEngine, sample_next, speculative_generate
from megatron_dsv3.data import ByteTokenizer, builtin_corpus
from tests.distributed import REPO

TOL = 1e-5
VARIANTS = {
    "tiny": {},
    "no-q-lora-no-yarn": {"q_lora_rank": None, "rope_scaling": None},
}


def build(runtime, **overrides):
    runtime.initialize(tp=1, pp=1, ep=1, seed=1234)
    cfg = m.presets.get_preset("tiny").replace(**overrides)
    return cfg, m.build_model(cfg, backend="local").eval()


def full_logits(model, seq):
    with torch.no_grad():
        return model(seq, torch.arange(seq.shape[1]).expand_as(seq), None)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A briefly trained tiny model (dsv3-pretrain, 80 steps, MTP trained too), saved as a checkpoint."""
    out = tmp_path_factory.mktemp("inference_ckpt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "megatron_dsv3.training.pretrain", "--preset", "tiny", "--seq-length", "64",
           "--micro-batch-size", "8", "--train-iters", "80", "--lr", "3e-3", "--lr-warmup-iters", "10",
           "--save", str(out), "--save-interval", "80", "--no-progress"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def trained(runtime, trained_ckpt):
    cfg, model = build(runtime)
    load_checkpoint(trained_ckpt, [model], load_rng=False)
    return cfg, model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decoding_matches_full_recompute_at_every_step(runtime, variant):
    cfg, model = build(runtime, **VARIANTS[variant])
    engine = InferenceEngine(model, capacity=48)
    prompt = torch.randint(0, cfg.vocab_size, (2, 9))
    cache = engine.new_cache(batch=2)
    logits, _ = engine.forward(prompt, cache)
    seq = prompt
    worst = (logits - full_logits(model, seq)).abs().max().item()   # prefill: every prompt position
    for _ in range(14):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        logits, _ = engine.forward(nxt, cache)
        assert logits.shape == (2, 1, cfg.vocab_size)
        worst = max(worst, (logits[:, -1] - full_logits(model, seq)[:, -1]).abs().max().item())
    assert worst <= TOL, f"{variant}: cached vs full logits differ by {worst}"
    # ... through the plain decode forms: routed experts run only where tokens went, linears without wrappers.
    assert [type(layer.feed_forward).__name__ for layer in engine.layers] == ["function"] + ["RoutedExperts"] * 3
    assert cache.length == seq.shape[1]

    # Negative control: the same check notices a wrong cache (one stale latent entry).
    cache.latent[1][:, 3] += 0.5
    cache.truncate(seq.shape[1] - 1)
    bad, _ = engine.forward(seq[:, -1:], cache)
    assert (bad[:, -1] - full_logits(model, seq)[:, -1]).abs().max().item() > 1e-3


def test_cached_decoding_matches_beyond_the_yarn_original_context(runtime):
    """Positions past YaRN's original_max_position_embeddings (256 for tiny) use the same rotary table."""
    cfg, model = build(runtime)
    assert cfg.rope_scaling.original_max_position_embeddings < 262
    engine = InferenceEngine(model, capacity=270)
    seq = torch.randint(0, cfg.vocab_size, (1, 262))
    cache = engine.new_cache()
    logits, _ = engine.forward(seq, cache)
    worst = (logits - full_logits(model, seq)).abs().max().item()
    for _ in range(4):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        logits, _ = engine.forward(nxt, cache)
        worst = max(worst, (logits[:, -1] - full_logits(model, seq)[:, -1]).abs().max().item())
    assert worst <= TOL, worst


@pytest.mark.parametrize("tokens,in_buffer,path", [(1, False, "gather"), (3, False, "gather"), (1, False, "grouped"),
                                                    (3, False, "grouped"), (3, True, "expert by expert")])
def test_routed_experts_equal_the_moe_layer_and_run_only_the_chosen_experts(runtime, monkeypatch, tokens,
                                                                            in_buffer, path):
    """Decode's MoE step equals the training MoE layer, and experts no token chose are never computed: their
    weights, poisoned with NaN after the reference, leave the output finite and unchanged. Each path is
    forced: pairs that gather their experts' weights, grouped GEMMs, and weights inside a larger buffer (as
    megatron-core's DDP keeps them) read in place, expert by expert."""
    from megatron_dsv3.inference import plain_modules
    from megatron_dsv3.inference.plain_modules import RoutedExperts, module_output

    monkeypatch.setattr(plain_modules, "GATHER_BYTES", 0 if path == "grouped" else 1 << 40)
    real_grouped, grouped_calls = plain_modules.grouped_linear, []
    monkeypatch.setattr(plain_modules, "grouped_linear", lambda *a: grouped_calls.append(a) or real_grouped(*a))

    cfg, model = build(runtime)
    moe = model.decoder.layers[1].mlp
    if in_buffer:
        params = [p for p in moe.parameters()][::-1]
        buffer = torch.zeros(sum(p.numel() for p in params) + 7)
        offset = 7
        for p in params:
            view = buffer[offset:offset + p.numel()].view_as(p)
            view.copy_(p.data)
            p.data, offset = view, offset + p.numel()
    fast = RoutedExperts(moe)
    assert (fast.fc1 is None) == in_buffer
    x = torch.randn(tokens, 1, cfg.hidden_size)
    with torch.no_grad():
        want = module_output(moe(x))
        chosen = set(moe.router.select(torch.nn.functional.linear(x.reshape(tokens, -1), moe.router.weight))[1]
                     .flatten().tolist())
        assert len(chosen) < cfg.n_routed_experts
        for i, expert in enumerate(moe.experts.local_experts):
            if i not in chosen:
                expert.linear_fc1.weight.fill_(float("nan"))
                expert.linear_fc2.weight.fill_(float("nan"))
        got = fast(x)
    if not in_buffer:
        assert torch.isnan(fast.fc1).any()  # the experts' weights are views of the stacked tensor,
        assert RoutedExperts(moe).fc1.data_ptr() == fast.fc1.data_ptr()  # which a second engine reuses
    assert torch.allclose(got, want, atol=1e-6)
    assert bool(grouped_calls) == (path == "grouped")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cache_holds_only_the_normalised_latent_and_rotated_rope_key(runtime, variant):
    cfg, model = build(runtime, **VARIANTS[variant])
    engine = InferenceEngine(model, capacity=32)
    cache = engine.new_cache(batch=3)
    prompt = torch.randint(0, cfg.vocab_size, (3, 11))
    captured = {}
    attn0 = model.decoder.layers[0].self_attention

    def grab(mod, args, kwargs):
        captured["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hook = attn0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        full_logits(model, prompt)
    finally:
        hook.remove()
    engine.forward(prompt, cache)

    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.num_layers == cfg.num_hidden_layers
    for latent, k_rope in zip(cache.latent, cache.k_rope):
        assert latent.shape == (3, 32, cfg.kv_lora_rank)
        assert k_rope.shape == (3, 32, cfg.qk_rope_head_dim)
    assert cache.values_per_token_per_layer() == per_token
    stored = sum(t.numel() for t in cache.latent + cache.k_rope)
    assert stored == 3 * 32 * cfg.num_hidden_layers * per_token
    assert cache.bytes_per_token() == cfg.num_hidden_layers * per_token * 4   # fp32
    assert engine.standard_kv_bytes_per_token() > cache.bytes_per_token()

    # Layer 0's entries are kv_layernorm(latent part of linear_kv_down_proj(x)) of the model's own modules.
    with torch.no_grad():
        kv, _ = attn0.linear_kv_down_proj(captured["x"])
        want = attn0.kv_layernorm(kv[..., : cfg.kv_lora_rank]).transpose(0, 1)
    assert torch.allclose(cache.latent[0][:, :11], want, atol=1e-6)
    assert cache.latent[0][:, 11:].abs().sum() == 0   # nothing written beyond the tokens seen


def test_mtp_drafts_match_megatron_mtp_module(runtime):
    cfg, model = build(runtime)
    engine = InferenceEngine(model, capacity=32)
    seq = torch.randint(0, cfg.vocab_size, (1, 16))
    seen = {}

    def grab(mod, inp, out):
        seen["h"] = out

    hook = model.mtp.register_forward_hook(grab)
    try:
        full_logits(model, seq)
    finally:
        hook.remove()
    reference = engine._logits(seen["h"].chunk(2, dim=0)[1])[:, :15]  # position i predicts t_{i+2}
    main, mtp = engine.new_cache(), engine.new_cache(mtp=True)
    _, hidden = engine.forward(seq, main)
    pieces = [engine.mtp_forward(hidden[:10], seq[:, 1:11], mtp)]      # MTP "prefill", then one by one
    pieces += [engine.mtp_forward(hidden[i : i + 1], seq[:, i + 1 : i + 2], mtp) for i in range(10, 15)]
    assert mtp.latent[0].shape[-1] == cfg.kv_lora_rank and mtp.length == 15
    diff = (torch.cat(pieces, dim=1) - reference).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("variant", ["tiny", "no-q-lora-no-yarn"])
def test_mtp_last_only_fills_the_same_cache_and_last_logits(runtime, variant):
    """With last_only, the earlier positions only get cache entries (no attention output, no MoE): the cache,
    the last logits and the next step after it equal the full pass (a prompt that starts mid-cache)."""
    cfg, model = build(runtime, **VARIANTS[variant])
    engine = InferenceEngine(model, capacity=48)
    seq = torch.randint(0, cfg.vocab_size, (1, 30))
    _, hidden = engine.forward(seq, engine.new_cache())
    results = []
    for last_only in (False, True):
        mtp = engine.new_cache(mtp=True)
        engine.mtp_forward(hidden[:5], seq[:, 1:6], mtp)                     # entries already in the cache
        logits, x = engine.mtp_forward(hidden[5:28], seq[:, 6:29], mtp, last_only=last_only, with_hidden=True)
        after = engine.mtp_forward(hidden[28:29], seq[:, 29:30], mtp)
        results.append((logits[:, -1], x[-1], mtp.keys[0][:, :29].clone(), after))
    assert results[1][0].shape == results[0][0].shape and mtp.length == 29
    for full, last in zip(*results):
        assert (full - last).abs().max().item() <= TOL


def test_mtp_input_norm_pair_is_both_norms_bit_for_bit_and_follows_their_weights(runtime):
    """The MTP module's enorm and hnorm run as one rms_norm over both halves: the same bits as the two modules,
    and their weights stay the modules' own (an in-place update, as an optimizer makes, shows up)."""
    from megatron_dsv3.inference.plain_modules import plain_norm_pair

    cfg, model = build(runtime)
    layer = model.mtp.layers[0]
    pair = plain_norm_pair(layer.enorm, layer.hnorm)
    e, h = torch.randn(3, 2, cfg.hidden_size), torch.randn(3, 2, cfg.hidden_size)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(pair(e, h), torch.cat([layer.enorm(e), layer.hnorm(h)], dim=-1))
            layer.hnorm.weight.mul_(1.5)


def test_chained_drafts_match_one_shot_mtp(runtime, monkeypatch):
    """Every draft's logits equal the MTP module run in one shot with a fresh cache over what that draft should
    see: the true pairs (h_i, t_{i+1}) up to the last emitted token, then for draft j > 1 the chain
    (x, d_{j-1}) with x the module's own normed output. So chained entries leave the MTP cache after each step
    and the true pairs of the accepted tokens take their place."""
    cfg, model = build(runtime)
    engine = InferenceEngine(model, capacity=64)
    prompt = torch.randint(0, cfg.vocab_size, (6,)).tolist()
    calls, drafts, step_starts = [], [], []
    mtp_forward = engine.mtp_forward

    def recording(*args, **kwargs):
        result = mtp_forward(*args, **kwargs)
        if kwargs.get("last_only"):                                        # a step's first draft
            step_starts.append(len(calls))
        calls.append(result[0][0, -1].clone())
        return result

    monkeypatch.setattr(engine, "mtp_forward", recording)
    out = speculative_generate(engine, prompt, 14, draft_tokens=3, min_acceptance=0.0,
                               draft_hook=lambda pos, d: drafts.append((pos, int(d))) or d)
    monkeypatch.undo()
    assert len(calls) == len(drafts) >= 12
    seq = torch.tensor([prompt + out.as_list()])
    _, hidden = engine.forward(seq, engine.new_cache())                  # h_i for every position
    assert step_starts[0] == 0 and all(0 < b - a <= 3 for a, b in zip(step_starts, step_starts[1:] + [len(calls)]))
    for j, (pos, _) in enumerate(drafts):
        depth = j - max(s for s in step_starts if s <= j)                  # 0: the first draft of its step
        n = pos - 1 - depth                                                # main-cache length at that step
        h, nxt = hidden[:n], seq[:, 1 : n + 1]                             # the true pairs, positions 0..n-1
        for _, chained in drafts[j - depth : j]:                           # then the chain so far
            _, x = engine.mtp_forward(h, nxt, engine.new_cache(mtp=True), with_hidden=True)
            h, nxt = torch.cat([h, x[-1:]]), torch.cat([nxt, torch.tensor([[chained]])], dim=1)
        want = engine.mtp_forward(h, nxt, engine.new_cache(mtp=True))[0, -1]
        assert (calls[j] - want).abs().max().item() <= TOL, (pos, depth)


def check_speculative_equals_greedy(model, engine, prompts, new_tokens, draft_tokens=1):
    drafted = accepted = 0
    for prompt in prompts:
        plain = engine.generate(prompt, new_tokens)
        spec = speculative_generate(engine, prompt, new_tokens, draft_tokens=draft_tokens)
        assert spec.as_list() == plain.as_list(), f"prompt {prompt[:8]}..."
        assert len(spec.as_list()) == new_tokens
        # Independent oracle: every greedy token is the argmax of full recomputation (teacher forced).
        seq = torch.tensor([list(prompt) + plain.as_list()])
        oracle = full_logits(model, seq)[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        assert oracle == plain.as_list()
        st = spec.stats
        assert st["main_model_steps"] == 1 + st["verify_steps"] + st["plain_steps"]
        assert st["tokens_per_main_step"] == pytest.approx(new_tokens / st["main_model_steps"])
        assert st["drafted"] <= draft_tokens * st["verify_steps"]
        drafted, accepted = drafted + st["drafted"], accepted + st["accepted_drafts"]
    return drafted, accepted


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_speculative_equals_greedy_random_init(runtime, draft_tokens):
    cfg, model = build(runtime)
    engine = InferenceEngine(model, capacity=64)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (1, 5, 17)]
    drafted, accepted = check_speculative_equals_greedy(model, engine, prompts, 20, draft_tokens)
    assert drafted > accepted   # untrained drafts are rejected: the rollback path runs


def forced_steps(pattern: str, draft_tokens: int, new_tokens: int, min_acceptance: float = 0.35) -> list[list[bool]]:
    """The verification steps that drafts forced by `pattern` (cycled) must give, from the rules alone: a step
    drafts min(draft_tokens, tokens still wanted - 1) and emits its leading accepts plus one; 16 steps with
    drafts whose first draft was accepted in fewer than `min_acceptance` of them end speculation."""
    emitted, used, steps, recent = 1, 0, [], []
    while emitted < new_tokens:
        step = [pattern[(used + i) % len(pattern)] == "A" for i in range(min(draft_tokens, new_tokens - emitted - 1))]
        used += len(step)
        leading = next((i for i, ok in enumerate(step) if not ok), len(step))
        emitted, steps = emitted + leading + 1, steps + [step]
        recent = (recent + [leading > 0])[-16:] if step else recent
        if len(recent) == 16 and sum(recent) < min_acceptance * 16:
            break
    return steps


def test_speculative_bookkeeping_under_forced_accept_reject_patterns(runtime):
    """Drafts forced right or wrong in a fixed pattern: every accept/reject sequence (reject then accept, runs of
    accepts, rollbacks) still yields exactly the greedy tokens, and the counts follow the pattern."""
    cfg, model = build(runtime)
    engine = InferenceEngine(model, capacity=64)
    prompt = torch.randint(0, cfg.vocab_size, (7,)).tolist()
    greedy = prompt + engine.generate(prompt, 30).as_list()
    for pattern in ("ARAARRRAAAARAR", "A", "R", "RA"):
        decisions = []

        def hook(position, draft, pattern=pattern):
            accept = pattern[len(decisions) % len(pattern)] == "A"
            decisions.append(accept)
            return torch.tensor(greedy[position] if accept else (greedy[position] + 1) % cfg.vocab_size)

        spec = speculative_generate(engine, prompt, 30, draft_tokens=1, draft_hook=hook)
        assert spec.as_list() == greedy[len(prompt):], pattern
        steps = forced_steps(pattern, 1, 30)
        assert sum(map(len, steps)) == len(decisions) == spec.stats["drafted"], pattern
        assert spec.stats["accepted_drafts"] == sum(decisions) and spec.stats["verify_steps"] == len(steps)
        fell_back_at = spec.stats["fell_back_to_plain_at"]  # only all-rejects falls under 35% over 16 drafts
        assert (fell_back_at is not None) == (pattern == "R"), pattern
        plain_steps = 30 - fell_back_at if fell_back_at else 0
        assert spec.stats["main_model_steps"] == 1 + len(steps) + plain_steps
        if pattern == "R":
            assert fell_back_at == 1 + 16  # the first token, then one per rejected draft


@pytest.mark.parametrize("pattern", ["AAA", "ARA", "AAR", "RAA", "AARRAAAAR"])
def test_chained_draft_bookkeeping_under_forced_patterns(runtime, pattern):
    """Three drafts per step forced right or wrong: a step emits its leading accepted drafts plus the main
    model's next token (a reject after an accept rolls the cache back to that point), the output is the greedy
    output, the counts follow the pattern, and no draft guesses past the last token asked for."""
    cfg, model = build(runtime)
    engine = InferenceEngine(model, capacity=64)
    prompt = torch.randint(0, cfg.vocab_size, (5,)).tolist()
    greedy = prompt + engine.generate(prompt, 40).as_list()
    decisions, positions = [], []

    def hook(position, draft):
        accept = pattern[len(decisions) % len(pattern)] == "A"
        decisions.append(accept)
        positions.append(position)
        return torch.tensor(greedy[position] if accept else (greedy[position] + 1) % cfg.vocab_size)

    for new_tokens in (28, 29, 30):
        decisions.clear()
        positions.clear()
        spec = speculative_generate(engine, prompt, new_tokens, draft_tokens=3, min_acceptance=0.0, draft_hook=hook)
        assert spec.as_list() == greedy[len(prompt) : len(prompt) + new_tokens]
        steps = forced_steps(pattern, 3, new_tokens, min_acceptance=0.0)
        leading = [next((i for i, ok in enumerate(step) if not ok), len(step)) for step in steps]
        st = spec.stats
        assert st["verify_steps"] == len(steps) and st["drafted"] == len(decisions) == sum(map(len, steps))
        assert st["accepted_drafts"] == sum(leading)
        assert max(positions) <= len(prompt) + new_tokens - 2  # the last token comes from the verification


def test_speculative_fits_the_cache_greedy_fits(runtime):
    """Drafts stop at the last token asked for, so speculative decoding needs no cache positions beyond
    greedy's (prompt + new tokens): with every draft accepted it fills exactly that cache, and one fewer
    position is refused by both with the same error."""
    cfg, model = build(runtime)
    prompt = torch.randint(0, cfg.vocab_size, (5,)).tolist()
    new_tokens = 23
    engine = InferenceEngine(model, capacity=len(prompt) + new_tokens)
    greedy = prompt + engine.generate(prompt, new_tokens).as_list()
    spec = speculative_generate(engine, prompt, new_tokens, draft_tokens=4, min_acceptance=0.0,
                                draft_hook=lambda position, draft: torch.tensor(greedy[position]))
    assert spec.as_list() == greedy[len(prompt):]
    assert spec.stats["accepted_drafts"] == spec.stats["drafted"] > 0
    short = InferenceEngine(model, capacity=len(prompt) + new_tokens - 1)
    for run in (lambda: short.generate(prompt, new_tokens), lambda: speculative_generate(short, prompt, new_tokens)):
        with pytest.raises(ValueError, match="max_new_tokens: .* exceeds the cache capacity"):
            run()


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_speculative_equals_greedy_trained_model(trained, draft_tokens):
    cfg, model = trained
    engine = InferenceEngine(model, capacity=128)
    text = builtin_corpus()
    tok = ByteTokenizer()
    prompts = [tok.tokenize(text[i : i + 24]) for i in (1000, 25000, 90000, 200000)]
    drafted, accepted = check_speculative_equals_greedy(model, engine, prompts, 40, draft_tokens)
    # The trained MTP head's own drafts get accepted (random init: none are), chained ones too.
    assert accepted / drafted > 0.3, (accepted, drafted)


def test_sampling_is_seeded_and_filters_apply(runtime):
    cfg, model = build(runtime)
    engine = InferenceEngine(model, capacity=48)
    prompt = torch.randint(0, cfg.vocab_size, (2, 6))
    kw = dict(greedy=False, temperature=1.5)
    a = engine.generate(prompt, 24, seed=11, **kw).tokens
    b = engine.generate(prompt, 24, seed=11, **kw).tokens
    c = engine.generate(prompt, 24, seed=12, **kw).tokens
    greedy = engine.generate(prompt, 24).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy)
    assert torch.equal(engine.generate(prompt, 24, greedy=False, top_k=1, seed=3).tokens, greedy)
    assert torch.equal(engine.generate(prompt, 24, greedy=False, top_p=1e-6, seed=3).tokens, greedy)

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).expand(4000, -1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, greedy=False, top_k=3, generator=gen).tolist()) == {0, 1, 2}
    p = torch.softmax(logits[0], -1)   # p[0] + p[1] ~ 0.90: a 0.85 nucleus keeps exactly the top two
    assert p[0] < 0.85 < p[0] + p[1]
    assert set(sample_next(logits, greedy=False, top_p=0.85, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, greedy=False, generator=gen).tolist()) == set(range(6))


def run_cli(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "megatron_dsv3.inference.cli", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_greedy_speculative_and_bad_load(trained_ckpt, tmp_path):
    common = ["--load", str(trained_ckpt), "--preset", "tiny", "--prompt", "The return statement",
              "--max-new-tokens", "30"]
    runs = {}
    for mode in ("--greedy", "--speculative"):  # speculative: the default 3 chained drafts per step
        result = run_cli(*common, mode)
        assert result.returncode == 0, result.stderr[-3000:]
        lines = result.stdout.rstrip("\n").split("\n")
        runs[mode] = ("\n".join(lines[:-1]), json.loads(lines[-1]))
    (g_text, g), (s_text, s) = runs["--greedy"], runs["--speculative"]
    assert g_text == s_text == ByteTokenizer().detokenize(g["tokens"])   # stdout is just the text + JSON
    assert g["tokens"] == s["tokens"] and g["new_tokens"] == s["new_tokens"] == 30
    assert g["cache_bytes_per_token"] == s["cache_bytes_per_token"] == 4 * (32 + 8) * 4
    assert g["tokens_per_s"] > 0 and g["acceptance_rate"] is None
    assert 0 <= s["acceptance_rate"] <= 1 and s["tokens_per_main_step"] >= 1

    sampled = [run_cli(*common, "--temperature", "0.9", "--top-k", "20", "--seed", "5") for _ in range(2)]
    assert sampled[0].returncode == 0, sampled[0].stderr[-3000:]
    texts = [r.stdout.rstrip("\n").rsplit("\n", 1)[0] for r in sampled]
    assert texts[0] == texts[1] and json.loads(sampled[0].stdout.rstrip("\n").rsplit("\n", 1)[1])["mode"] == "sample"

    bad = run_cli("--load", str(tmp_path / "missing"), "--preset", "tiny", "--prompt", "x")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("dsv3-generate: error: --load:")
