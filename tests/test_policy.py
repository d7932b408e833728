"""Specification of policy.py: log-probs that do not depend on batching or padding, greedy generation
with the KV cache equal to a plain loop, LoRA as an exact no-op that merges and saves faithfully, the
reference policy, and load_policy's failure modes. Models are ~0.2 M-parameter random Qwen2s
(conftest.make_policy); fp32 throughout."""
import time

import pytest
import torch

import policy as P
import ppo
import rollout
from conftest import SMALL
from harness import models
from harness import toolclient


def random_episodes(seed, shapes, vocab=2048):
    """[(prompt, action, observation, action)] token counts -> Episodes of random non-special ids."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    eps = []
    for n_p, n_a, n_o, n_b in shapes:
        ep = rollout.Episode()
        ep.add_context(r(n_p)); ep.add_action(r(n_a)); ep.add_context(r(n_o)); ep.add_action(r(n_b))
        eps.append(ep)
    return eps


EPS = [(7, 3, 4, 2), (15, 5, 9, 4), (3, 2, 2, 1)]


def forward(pol, eps, mode="step"):
    c = ppo.collate(eps, mode, pol.device)
    with torch.no_grad():
        return pol(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])[:2]


def randomize_lora(pol, seed=1, scale=0.1):
    """As if trained: B != 0 (B = 0 would hide any merge or save mistake)."""
    g = torch.Generator().manual_seed(seed)
    for m in pol.lora_modules():
        m.B.data = torch.randn(m.B.shape, generator=g) * scale
    pol.v_head.weight.data += 0.1


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


# ---- log-probs: batching and padding -------------------------------------------------------------
@pytest.mark.parametrize("mode", ["step", "token"])
def test_batched_log_probs_and_values_equal_per_episode_ones(make_policy, mode):
    pol = make_policy().eval()
    randomize_lora(pol)
    eps = random_episodes(0, EPS)
    logp, V = forward(pol, eps, mode)
    alone = [forward(pol, [e], mode) for e in eps]
    torch.testing.assert_close(logp, torch.cat([a[0] for a in alone]), atol=1e-5, rtol=0)
    torch.testing.assert_close(V, torch.cat([a[1] for a in alone]), atol=1e-5, rtol=0)
    assert len(logp) == sum(sum(e.act) for e in eps)


def test_left_and_right_padding_give_the_same_log_probs(make_policy):
    pol = make_policy().eval()
    randomize_lora(pol)
    eps = random_episodes(0, EPS)
    c = ppo.collate(eps, "step", pol.device)  # right padding
    T = c["ids"].shape[1]
    shift = torch.tensor([T - len(e.ids) for e in eps])
    ids = torch.zeros_like(c["ids"]); mask = torch.zeros_like(c["mask"])
    for b, e in enumerate(eps):  # the same rows, padded on the left by hand
        ids[b, shift[b]:] = torch.tensor(e.ids); mask[b, shift[b]:] = 1
    (ab, at), (vb, vt) = c["act_idx"], c["v_idx"]
    with torch.no_grad():
        right = pol(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
        left = pol(ids, mask, (ab, at + shift[ab]), c["act_tok"], (vb, vt + shift[vb]))
    torch.testing.assert_close(left[0], right[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(left[1], right[1], atol=1e-5, rtol=0)


def greedy_without_cache(model, prompt, n, stop_ids):
    """The reference: one full forward of the unpadded sequence per new token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(logits(model, ids)[-1].argmax()))
        if ids[-1] in stop_ids:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("cache", ["rows", "slots"])
def test_greedy_generate_equals_a_no_cache_loop_alone_and_inside_a_left_padded_batch(make_policy, monkeypatch, cache):
    pol = make_policy().eval()
    if cache == "slots":
        monkeypatch.setattr(pol.model, "kv_cache", rollout._Slots)   # the one-tensor cache (any attention)
    randomize_lora(pol, scale=1.0)  # a fresh random model repeats one token forever; this one does not
    g = torch.Generator().manual_seed(5)
    short, mid, long = (torch.randint(3, 2048, (n,), generator=g).tolist() for n in (4, 11, 23))
    ref = greedy_without_cache(pol.model, mid, 12, pol.stop_ids)
    assert len(set(ref)) > 1  # not a degenerate repeat of one token
    assert rollout.generate(pol, [mid], 12, temperature=0) == [ref]
    assert rollout.generate(pol, [long, mid, short], 12, temperature=0)[1] == ref
    assert rollout.generate(pol, [short, mid], 12, temperature=0)[1] == ref


def test_prompt_lookup_drafts_follow_the_last_earlier_occurrence_of_the_last_three_tokens():
    assert rollout._draft([1, 2, 3, 9, 9, 1, 2, 3, 4, 1, 2, 3], 2) == [4, 1]   # the later occurrence, not the first
    assert rollout._draft([1, 2, 3, 9, 1, 2, 3], 8) == [9, 1, 2, 3, 9, 1, 2, 3]   # looked up again after its end
    assert rollout._draft([1, 2, 3, 9, 1, 2, 3], 6) == [9, 1, 2, 3, 9, 1]      # never more than k
    assert rollout._draft([4, 1, 2, 3, 9, 1, 2, 3], 9) == [9, 1, 2, 3, 9, 1, 2, 3, 9]   # the period, not the first follower
    assert rollout._draft([5, 6, 7, 8], 4) == [] and rollout._draft([1, 2, 3, 1, 2, 3], 0) == []


def test_a_lone_greedy_row_decodes_through_prompt_lookup_exactly_as_one_token_at_a_time(make_policy, monkeypatch):
    pol = make_policy().eval()
    randomize_lora(pol, scale=0.3)
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(3, 2048, (6,), generator=g).tolist() * 3           # a repeated stretch: drafts to find
    ref = greedy_without_cache(pol.model, prompt, 40, pol.stop_ids)
    forwards, real = [], rollout._forward
    monkeypatch.setattr(rollout, "_forward", lambda *a, **k: forwards.append(k.get("every", False)) or real(*a, **k))
    assert rollout.generate(pol, [prompt], 40, temperature=0) == [ref]
    assert sum(forwards) < len(ref) - 1 and len(forwards) < len(ref)         # fewer forwards than tokens: drafts taken


@pytest.mark.parametrize("packs", [True, False])
def test_a_greedy_tail_of_several_rows_decodes_through_prompt_lookup_exactly_as_one_token_at_a_time(make_policy, monkeypatch,
                                                                                                     packs):
    """Up to DRAFT_ROWS rows draft at once, each its own length, in one forward: packed in one sequence (the rows'
    attention), or padded (any other); a row that stops between them leaves a gap; each row's output is its greedy one alone."""
    torch.manual_seed(0)                                                                   # LoRA's A
    pol = make_policy().eval()
    randomize_lora(pol, scale=0.3)
    monkeypatch.setattr(pol.model, "packs_rows", packs)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 2048, (n,), generator=g).tolist() * 3 for n in (6, 4, 9)]   # repeats: drafts to find
    refs = [greedy_without_cache(pol.model, p, 40, []) for p in prompts]
    stop = next(t for j, t in enumerate(refs[1]) if j >= 3 and t not in refs[1][:j] + refs[0] + refs[2])   # row 1 alone stops
    pol.stop_ids = sorted({*pol.stop_ids, stop})
    refs = [greedy_without_cache(pol.model, p, 40, pol.stop_ids) for p in prompts]
    assert len(refs[1]) < min(len(refs[0]), len(refs[2]))                                  # a gap between live rows
    forwards, real = [], rollout._forward

    def spy(policy, kv, rows, ids, *a, **k):
        out = real(policy, kv, rows, ids, *a, **k)
        forwards.append((len(rows), sorted({len(x) for x in ids}), tuple(kv.at[2].shape), k.get("every", False)))
        return out
    monkeypatch.setattr(rollout, "_forward", spy)
    assert rollout.generate(pol, prompts, 40, temperature=0) == refs
    several = [(ls, shape) for b, ls, shape, draft in forwards if draft and b > 1 and ls[-1] > 1]   # several rows drafted at once
    assert several and len(forwards) < max(map(len, refs))                                 # fewer forwards than tokens
    uneven = [(ls, shape) for ls, shape in several if len(ls) > 1]                         # drafts of several lengths
    assert uneven and all(shape[0] == 1 for _, shape in uneven) == packs                   # [1, Q]: one sequence, no pads
    assert all(shape[0] > 1 for _, shape in uneven) != packs
    lens = sorted(map(len, prompts))                                                       # the prompts: packed, or one by one
    assert ((3, lens, (1, sum(lens)), False) in forwards) == packs
    assert all((1, [n], (1, n), False) in forwards for n in lens) != packs


def test_the_several_rows_attention_equals_transformers_sdpa_over_repeated_key_heads(monkeypatch):
    """harness.attention: each row over its own keys, query heads packed per key head, as SDPA over repeat_kv
    computes it: rows of different lengths (a causal tail), a left-padded row, 3 query heads a key head; a decode
    step (one query a row) row by row when its padding outweighs ROW_KEYS keys a row, else SDPA's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from harness import attention
    from harness.attention import rows_attention

    class Layer:
        num_key_value_groups, is_causal = 3, True
    g = torch.Generator().manual_seed(0)
    b, H, KH, q, L, D = 3, 6, 2, 4, 11, 8
    query, key, value = (torch.randn(b, h, n, D, generator=g) for h, n in ((H, q), (KH, L), (KH, L)))
    pos = torch.tensor([[10], [6], [8]]) - torch.arange(q).flip(0)             # row r's queries end at 10, 6, 8
    mask = (torch.arange(L) <= pos[..., None])[:, None]                        # [b, 1, q, L]
    mask[2, ..., :3] = False                                                   # row 2: left padding
    ours, _ = rows_attention(Layer, query, key, value, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(Layer, query, key, value, mask, scaling=0.3)
    assert ours.shape == ref.shape == (b, q, H, D)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    one = [t[1:2] for t in (query, key, value, mask)]                          # a lone row past its first tokens
    torch.testing.assert_close(rows_attention(Layer, *one, scaling=0.3)[0], sdpa_attention_forward(Layer, *one, scaling=0.3)[0],
                               atol=1e-6, rtol=0)
    for row_keys, alone in ((0, True), (1 << 20, False)):                      # one token a row (decoding): row by row or not
        called = []
        monkeypatch.setattr(attention, "ROW_KEYS", row_keys)
        monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: called.append(1) or sdpa_attention_forward(*a, **k))
        step = [query[:, :, -1:], key, value, mask[:, :, -1:]]                 # rows' last queries: 11, 7, 9 keys (2 padded)
        torch.testing.assert_close(rows_attention(Layer, *step, scaling=0.3)[0], sdpa_attention_forward(Layer, *step, scaling=0.3)[0],
                                   atol=1e-6, rtol=0)
        assert bool(called) != alone
    with pytest.raises(ValueError, match="softcap"):                           # Gemma 2's soft-capping: SDPA's own refusal
        rows_attention(Layer, query, key, value, mask, scaling=0.3, softcap=50.0)
    packed = [torch.cat([t[r] for r in (0, 2)], 1)[None] for t in (query, mask)]   # rows 0 and 2 packed, row 1 none
    out, _ = rows_attention(Layer, packed[0], key, value, packed[1], scaling=0.3, rows_q=[q, 0, q])
    assert out.shape == (1, 2 * q, H, D)
    torch.testing.assert_close(out[0], ours[[0, 2]].reshape(2 * q, H, D), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="packed rows"):                       # never SDPA over packed rows
        rows_attention(Layer, packed[0], key, value, packed[1], scaling=0.3, rows_q=[q, 0, q], softcap=50.0)

def two_turns(pol, prompts, observations, new, slots=None):
    """Each prompt's first and second turns through the sampler's loop, the second from the cached first:
    finish() gives each episode its observation once, then ends it."""
    turns, seen, todo = {}, set(), iter(enumerate(prompts))

    def finish(ended):
        out = []
        for i, t, _ in ended:
            turns.setdefault(i, []).append(list(t))
            out.append(None if i in seen else observations[i])
            seen.add(i)
        return out
    with torch.no_grad(), rollout.merged_lora(pol):
        rollout._sample_turns(pol, slots or len(prompts), lambda: next(todo, None), finish, new, 0, 1.0, None, None)
    return [turns[i] for i in range(len(prompts))]


@pytest.mark.parametrize("cache", ["rows", "slots"])
def test_a_turn_from_the_cached_earlier_turns_equals_one_from_the_whole_dialogue(make_policy, monkeypatch, cache):
    pol = make_policy().eval()
    if cache == "slots":
        monkeypatch.setattr(pol.model, "kv_cache", rollout._Slots)
    randomize_lora(pol, scale=1.0)
    g = torch.Generator().manual_seed(8)
    a, b, c, obs_a, obs_b, obs_c = (torch.randint(3, 2048, (n,), generator=g).tolist() for n in (9, 17, 5, 6, 3, 11))
    got = two_turns(pol, [a, b, c], [obs_a, obs_b, obs_c], 7)
    first = rollout.generate(pol, [a, b, c], 7, temperature=0)
    assert [t[0] for t in got] == first
    second = [a + first[0] + obs_a, b + first[1] + obs_b, c + first[2] + obs_c]
    ref = [greedy_without_cache(pol.model, p, 7, pol.stop_ids) for p in second]
    assert len(set(ref[0])) > 1
    assert [t[1] for t in got] == ref
    # two slots: b ends after one turn, c takes its slot, a ends, c moves down to slot 0 and goes on
    assert two_turns(pol, [a, b, c], [obs_a, None, obs_c], 7, slots=2) == [got[0], got[1][:1], got[2]]


def test_a_cache_grown_for_a_long_tail_holds_only_the_slots_in_use(make_policy, monkeypatch):
    """Two slots: a and b end after one turn, c takes slot 0 and its long second turn grows the cache: the grown
    buffers hold one row, not two, and c's turn is still the one from its whole dialogue."""
    pol = make_policy().eval()
    randomize_lora(pol, scale=1.0)
    monkeypatch.setattr(pol.model, "kv_cache", rollout._Slots)     # the one-tensor cache (any attention)
    g = torch.Generator().manual_seed(9)
    a, b, c, obs_c = (torch.randint(3, 2048, (n,), generator=g).tolist() for n in (9, 17, 5, 60))
    shapes, real = [], rollout._SlotLayer.update
    monkeypatch.setattr(rollout._SlotLayer, "update", lambda self, *x, **k: (real(self, *x, **k), shapes.append(self.bk.shape[:3]))[0])
    got, grown = two_turns(pol, [a, b, c], [None, None, obs_c], 7, slots=2), list(shapes)
    first = rollout.generate(pol, [c], 7, temperature=0)[0]
    assert got[2] == [first, greedy_without_cache(pol.model, c + first + obs_c, 7, pol.stop_ids)]
    assert grown[0][0] == 2 and grown[-1] == (1, 2, len(c + first + obs_c) + 7)   # rows, KV heads, capacity


def test_the_cache_of_rows_holds_each_row_at_its_own_length_and_frees_an_ended_episodes(make_policy, monkeypatch):
    """RowCache: a short and a long episode at once; each row's tensors sized to its own tokens and turn, not to the
    longest row's; after the short one ends, the long one moves to its slot (no copy), the slot it left holds nothing,
    and its turn is still its greedy one; a row grows by ROW_ROOM tokens or an eighth, not by half."""
    from harness.attention import ROW_ROOM, RowCache, _RowLayer
    pol = make_policy().eval()
    randomize_lora(pol, scale=1.0)
    assert pol.model.kv_cache is RowCache
    g = torch.Generator().manual_seed(4)
    short, long, obs = (torch.randint(3, 2048, (n,), generator=g).tolist() for n in (5, 90, 40))
    seen, real = [], _RowLayer.update
    monkeypatch.setattr(_RowLayer, "update", lambda self, *x, **k: (real(self, *x, **k), seen.append(
        [None if t is None else t.shape[2] for t in self.k]))[0])
    got, caps = two_turns(pol, [short, long], [None, obs], 6), list(seen)
    first = rollout.generate(pol, [long], 6, temperature=0)[0]
    assert got[1] == [first, greedy_without_cache(pol.model, long + first + obs, 6, pol.stop_ids)]
    assert caps[0] == [max(len(short) + 6, ROW_ROOM), len(long) + 6]   # each prefilled with room for its turn, no more
    cap = len(long) + 6
    assert caps[-1] == [max(len(long + first + obs) + 6, cap + max(ROW_ROOM, cap // 8)), None]   # moved to slot 0, grown; 1 freed


def test_the_cache_of_rows_is_the_samplers_on_cpu_only(tiny_tok):
    """attention.use: packed rows wherever the model runs SDPA; tensors of its own for each row on CPU only (a GPU would
    pay a kernel launch a row and layer), so a model elsewhere (here on the meta device) samples through rollout._Slots."""
    from transformers import AutoModelForCausalLM
    from harness import attention
    cpu, _ = models.build_tiny(0, tok=tiny_tok, **SMALL)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cpu.config)
    meta.config._attn_implementation = "sdpa"
    attention.use(meta)
    assert cpu.kv_cache is attention.RowCache and cpu.packs_rows and meta.packs_rows and not hasattr(meta, "kv_cache")


@pytest.mark.parametrize("cache", ["rows", "slots"])
@pytest.mark.parametrize("full_layers", [0, 1])
def test_a_sliding_window_model_samples_its_greedy_turns_through_either_cache(tiny_tok, monkeypatch, cache, full_layers):
    """Layers that attend over their last 6 keys only (all, or all but the first): the sampler's masks keep each row's
    own window in decode steps and packed prefills alike, so each row's turn is the one a forward over its whole text
    gives (transformers' masks count the window back from the longest row's end)."""
    model, tok = models.build_tiny(3, tok=tiny_tok, **SMALL, use_sliding_window=True, sliding_window=6,
                                   max_window_layers=full_layers)
    assert model.config.layer_types.count("full_attention") == full_layers and model.window == (6, full_layers > 0)
    P.inject_lora(model.requires_grad_(False), 4, 8, 0.0)
    pol = P.Policy(model, tok, "tiny", dict(r=4, alpha=8, dropout=0.0, targets=list(P.LORA_TARGETS))).eval()
    randomize_lora(pol, scale=1.0)
    if cache == "slots":
        monkeypatch.setattr(pol.model, "kv_cache", rollout._Slots)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 2048, (n,), generator=g).tolist() for n in (4, 13, 9)]
    refs = [greedy_without_cache(pol.model, p, 12, pol.stop_ids) for p in prompts]
    assert rollout.generate(pol, prompts, 12, temperature=0) == refs
    assert rollout.generate(pol, prompts[1:2], 12, temperature=0) == refs[1:2]           # one row: transformers' own masks


def test_a_row_that_stops_early_leaves_the_other_rows_unchanged(make_policy):
    pol = make_policy().eval()
    g = torch.Generator().manual_seed(6)
    a, b = (torch.randint(3, 2048, (n,), generator=g).tolist() for n in (9, 14))
    ref_b = greedy_without_cache(pol.model, b, 10, pol.stop_ids)
    pol.stop_ids = [greedy_without_cache(pol.model, a, 1, [])[0]]  # a's first greedy token now ends its turn
    assert ref_b[:10].count(pol.stop_ids[0]) == 0
    out = rollout.generate(pol, [a, b], 10, temperature=0)
    assert out[0] == pol.stop_ids and out[1] == ref_b  # b goes on after a left the batch and the cache


def test_sampling_depends_on_each_rows_generator_only(make_policy):
    pol = make_policy().eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    both = rollout.generate(pol, prompts, 8, temperature=1.0, generators=gens(1, 2))
    assert rollout.generate(pol, prompts[1:], 8, temperature=1.0, generators=gens(2)) == both[1:]
    assert rollout.generate(pol, prompts, 8, temperature=1.0, generators=gens(1, 3))[0] == both[0]


def test_top_p_keeps_only_the_smallest_set_of_tokens_with_mass_top_p():
    logits_ = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    drawn = set(rollout._sample(logits_, 1.0, 0.75, gens).tolist())
    assert drawn == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    assert set(rollout._sample(logits_, 1.0, 1.0, gens).tolist()) == {0, 1, 2, 3}


# ---- LoRA, the reference policy, saving --------------------------------------------------------
@pytest.fixture
def base_model(tiny_tok):
    """base_model(seed): the random Qwen2 that make_policy(seed) wraps, without LoRA."""
    return lambda seed: models.build_tiny(seed, tok=tiny_tok, **SMALL)[0].eval()


IDS = list(range(3, 40))
TEXT = 'Thought: weather first.\nAction: forecast_for_skycast\nAction Input: {"city": "Velmora"}'


def test_fresh_lora_is_an_exact_no_op(make_policy, base_model):
    pol = make_policy(seed=2).eval()
    assert len(pol.lora_modules()) == 2 * 7 and all((m.B == 0).all() for m in pol.lora_modules())
    assert torch.equal(logits(pol.model, IDS), logits(base_model(2), IDS))


def test_only_lora_and_value_head_weights_train(make_policy):
    pol = make_policy()
    trainable = {n for n, p in pol.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) or n.startswith("v_head.") for n in trainable)


def test_reference_switches_lora_off_and_back_on(make_policy, base_model):
    pol = make_policy(seed=2).eval()
    randomize_lora(pol)
    eps = random_episodes(0, EPS)
    adapted = forward(pol, eps)[0]
    base_pol = P.Policy(base_model(2), pol.tok, "tiny").eval()
    with pol.reference():
        ref = forward(pol, eps)[0]
    torch.testing.assert_close(ref, forward(base_pol, eps)[0], atol=1e-6, rtol=0)
    assert (ref - adapted).abs().max() > 1e-3
    assert torch.equal(forward(pol, eps)[0], adapted)  # back on


def test_full_finetune_reference_is_a_frozen_copy_of_the_starting_weights(make_policy):
    pol = make_policy(seed=2, full_finetune=True).eval()
    assert all(p.requires_grad for p in pol.model.parameters())
    assert not any(p.requires_grad for p in pol.ref_model.parameters())
    eps = random_episodes(0, EPS)
    before = forward(pol, eps)[0]
    with torch.no_grad():
        pol.model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    with pol.reference():
        torch.testing.assert_close(forward(pol, eps)[0], before, atol=0, rtol=0)
    assert (forward(pol, eps)[0] - before).abs().max() > 1e-4


def test_export_merged_loads_in_plain_transformers_with_the_adapters_logits(make_policy, base_model, tmp_path):
    from transformers import AutoModelForCausalLM
    pol = make_policy(seed=2).eval()
    randomize_lora(pol)
    models.export_merged(pol, str(tmp_path))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert not any("lora" in n or n.endswith((".A", ".B")) for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, IDS), logits(pol.model, IDS), atol=1e-5, rtol=0)
    assert (logits(plain, IDS) - logits(base_model(2), IDS)).abs().max() > 1e-3  # the adapter is in there
    assert models.load_policy(str(tmp_path), device="cpu").tok(TEXT)["input_ids"] == pol.tok(TEXT)["input_ids"]


@pytest.mark.parametrize("full_finetune", [False, True])
def test_save_then_load_policy_restores_log_probs_values_and_reference(make_policy, tmp_path, full_finetune):
    pol = make_policy(seed=2, full_finetune=full_finetune).eval()
    eps = random_episodes(0, EPS)
    with pol.reference():
        ref = forward(pol, eps)[0]
    if full_finetune:  # as if trained: the weights move, the reference must not
        with torch.no_grad():
            for p in pol.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        pol.v_head.weight.data += 0.1
    else:
        randomize_lora(pol)
    models.save_policy(pol, str(tmp_path))
    back = models.load_policy(str(tmp_path), device="cpu").eval()
    assert back.full_finetune == full_finetune and back.lora_cfg == pol.lora_cfg
    for a, b in zip(forward(back, eps), forward(pol, eps)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with back.reference():
        torch.testing.assert_close(forward(back, eps)[0], ref, atol=1e-6, rtol=0)


def test_a_checkpoint_of_a_policy_from_a_relative_folder_loads_from_any_working_directory(
        tiny_tok, base_model, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    base_model(4).save_pretrained(str(tmp_path / "models" / "m")); tiny_tok.save_pretrained(str(tmp_path / "models" / "m"))
    monkeypatch.chdir(tmp_path / "models")
    pol = models.load_policy("m", device="cpu", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    randomize_lora(pol)
    models.save_policy(pol, str(tmp_path / "ckpt"))
    monkeypatch.chdir(tmp_path)
    back = models.load_policy(str(tmp_path / "ckpt"), device="cpu")
    eps = random_episodes(0, EPS)
    torch.testing.assert_close(forward(back, eps)[0], forward(pol.eval(), eps)[0], atol=1e-6, rtol=0)


# ---- load_policy ---------------------------------------------------------------------------------
def test_load_policy_on_an_unknown_name_fails_fast_saying_to_pass_a_local_folder():
    t0 = time.time()
    with pytest.raises(ValueError, match="local folder"):
        models.load_policy("nobody-here/no-such-model-xyz", device="cpu")
    assert time.time() - t0 < 30
    t0 = time.time()
    with pytest.raises(ValueError, match="No such file or directory"):   # a path is never probed as a Hub id
        models.load_policy("/no/such/folder", device="cpu")
    assert time.time() - t0 < 1


def test_load_policy_reads_a_save_pretrained_folder(tiny_tok, base_model, tmp_path):
    model = base_model(4)
    model.save_pretrained(str(tmp_path)); tiny_tok.save_pretrained(str(tmp_path))
    pol = models.load_policy(str(tmp_path), device="cpu", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    assert pol.source == str(tmp_path) and len(pol.lora_modules()) == 14
    assert pol.eot == "<|im_end|>" and pol.stop_ids == [pol.eot_id]
    assert pol.tok(TEXT)["input_ids"] == tiny_tok(TEXT)["input_ids"]  # as trained, not re-split as Qwen2's
    torch.testing.assert_close(logits(pol.model, IDS), logits(model, IDS), atol=0, rtol=0)
    out = rollout.generate(pol, [pol.encode_prompt([{"role": "user", "content": "hi"}])], 4, temperature=0)
    assert len(out[0]) >= 1


# ---- step-wise tokenization ----------------------------------------------------------------------
def test_step_wise_tokens_equal_the_whole_dialogue_rendered_by_the_chat_template(make_policy):
    pol = make_policy()
    msgs = [{"role": "system", "content": "Functions: f(x)"}, {"role": "user", "content": "Do it."}]
    ids = pol.encode_prompt(msgs)
    for act, obs in [("Thought: a\nAction: f\nAction Input: {}", '{"error": "", "response": 1}'),
                     ("Thought: b\nAction: Finish\nAction Input: {}", None)]:
        ids += pol.encode_action(act)  # ends with the end-of-turn token, as a sampled turn does
        msgs.append({"role": "assistant", "content": act})
        if obs is not None:
            msgs.append({"role": "function", "content": obs})
            ids += pol.encode_observation(msgs, ended=True)
    whole = pol.tok.apply_chat_template(msgs, tokenize=False).removesuffix("\n")  # after the last <|im_end|>: not sampled
    assert ids == pol.tok(whole, add_special_tokens=False)["input_ids"]


def test_a_turn_cut_by_max_new_tokens_gets_the_templates_end_of_turn_as_context(make_policy):
    pol = make_policy()
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Thought: cut"},
            {"role": "function", "content": "obs"}]
    ended = pol.encode_observation(msgs, ended=True)
    cut = pol.encode_observation(msgs, ended=False)
    assert cut == [pol.eot_id] + ended


# ---- real chat templates: the role of tool responses ---------------------------------------------
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import warnings  # noqa: E402

from conftest import FIXTURES  # noqa: E402

TEMPLATES = json.load(open(os.path.join(FIXTURES, "chat_templates.json")))


def templated_policy(tiny_tok, name):
    """A small random Qwen2 with the tiny BPE, the special tokens and the chat template of a model family."""
    spec = TEMPLATES[name]
    tok = copy.deepcopy(tiny_tok)
    tok.add_special_tokens({"additional_special_tokens": spec["special"]})
    tok.eos_token = spec["eos"]
    if spec["bos"]:
        tok.bos_token = spec["bos"]
    tok.chat_template = spec["template"]
    model, tok = models.build_tiny(0, tok=tok, **SMALL)
    return P.Policy(model, tok, "tiny")


@pytest.mark.parametrize("name,role", [("qwen2_instruct", "function"), ("qwen2_5_instruct", "tool"),
                                       ("llama3_1_instruct", "tool")])
def test_the_observation_role_is_the_one_each_chat_template_renders(tiny_tok, name, role):
    assert templated_policy(tiny_tok, name).obs_role == role


def test_a_template_with_no_role_for_tool_responses_falls_back_to_user(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] in ['system', 'user', 'assistant'] %}<|im_start|>"
                         "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert P.Policy(models.build_tiny(0, tok=tok, **SMALL)[0], tok, "tiny").obs_role == "user"


@pytest.mark.parametrize("name", list(k for k in TEMPLATES if not k.startswith("_")))
def test_every_observation_of_an_episode_is_in_its_tokens_under_each_real_template(tiny_tok, tool_server, test_tasks, name):
    import env
    pol = templated_policy(tiny_tok, name)
    task = next(t for t in test_tasks if t.group == "G3")           # several tool calls
    ep, traj = rollout.expert_episode(pol, task, toolclient.ToolClient(tool_server.url))
    text = pol.tok.decode(ep.ids, clean_up_tokenization_spaces=False)
    obs = [s.observation for s in traj.steps if s.name != "Finish"]
    assert len(obs) >= 2 and all(P.shows(o, text) for o in obs)
    # step-wise tokens are the whole dialogue as the template renders it, up to the last end of turn
    msgs = env.initial_messages(task)
    for s in traj.steps:
        msgs.append({"role": "assistant", "content": s.text})
        if s.name != "Finish":
            msgs.append({"role": pol.obs_role, "content": s.observation})
    whole = pol.tok.apply_chat_template(msgs, tokenize=False)
    assert ep.ids == pol.tok(whole[:whole.rindex(pol.eot) + len(pol.eot)], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["qwen2_5_instruct", "llama3_1_instruct"])
def test_a_role_the_template_drops_is_an_error_not_a_silent_loss(tiny_tok, name):
    pol = templated_policy(tiny_tok, name)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "Thought: t\nAction: f\nAction Input: {}"},
            {"role": "gadget", "content": '{"error": "", "response": "sunrise 06:31"}'}]
    if name == "qwen2_5_instruct":  # Qwen2.5 skips any role it does not know, `function` included
        with pytest.raises(ValueError, match="dropped a tool response"):
            pol.encode_observation(msgs, ended=True)
    msgs[-1]["role"] = pol.obs_role
    assert "sunrise 06:31" in pol.tok.decode(pol.encode_observation(msgs, ended=True))


# ---- end of turn, LoRA targets, the cache API -----------------------------------------------------
def test_every_eos_of_the_tokenizer_and_the_generation_config_stops_a_turn(make_policy):
    pol = make_policy()
    prompt = pol.encode_prompt([{"role": "user", "content": "hi"}])
    first = rollout.generate(pol, [prompt], 1, temperature=0)[0][0]          # the greedy first token ...
    assert first not in pol.stop_ids
    pol.model.generation_config.eos_token_id = [pol.eot_id, first]  # ... is an EOS of generation_config
    again = P.Policy(pol.model, pol.tok, "tiny")
    assert first in again.stop_ids and pol.eot_id in again.stop_ids
    assert rollout.generate(again, [prompt], 8, temperature=0) == [[first]]


def test_lora_targets_that_match_no_module_are_an_error_naming_the_models_linear_modules(base_model):
    with pytest.raises(ValueError, match="c_attn.*q_proj"):
        P.inject_lora(base_model(0), 4, 8, 0.0, targets=("c_attn",))


def test_generation_uses_the_cache_api_that_transformers_keeps(make_policy):
    pol = make_policy()
    prompt = pol.encode_prompt([{"role": "user", "content": "hi"}])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        two_turns(pol, [prompt, prompt[:-1]], [IDS[:5], IDS[:3]], 3)   # a next turn from the cache, two rows
    assert not [str(x.message) for x in w if "deprecated" in str(x.message)]


# ---- what a checkpoint holds, and what load_policy restores --------------------------------------
def test_a_loaded_checkpoint_has_every_load_option_it_was_saved_with(tiny_tok, base_model, tmp_path):
    base_model(4).save_pretrained(str(tmp_path / "m")); tiny_tok.save_pretrained(str(tmp_path / "m"))
    pol = models.load_policy(str(tmp_path / "m"), device="cpu", dtype=torch.bfloat16, lora_r=2, lora_alpha=4,
                        lora_dropout=0.1, lora_targets=("q_proj", "v_proj"), gradient_checkpointing=True)
    models.save_policy(pol, str(tmp_path / "ckpt"))
    back = models.load_policy(str(tmp_path / "ckpt"), device="cpu")      # as --resume loads it: no options given
    assert back.model.is_activation_checkpointing and back.compute_dtype == torch.bfloat16
    assert next(back.model.parameters()).dtype == torch.bfloat16
    assert back.lora_cfg == pol.lora_cfg == dict(r=2, alpha=4, dropout=0.1, targets=["q_proj", "v_proj"])
    assert len(back.lora_modules()) == len(pol.lora_modules()) == 4 and back.full_finetune is False
    assert back.lora_modules()[0].drop.p == 0.1


def files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def test_a_lora_run_writes_the_base_once_and_only_after_it_changed(tiny_tok, base_model, tmp_path):
    base_model(4).save_pretrained(str(tmp_path / "m")); tiny_tok.save_pretrained(str(tmp_path / "m"))
    run = tmp_path / "run"
    pol = models.load_policy(str(tmp_path / "m"), device="cpu", lora_r=4, lora_alpha=8)
    pol.freeze_reference()                                            # B = 0: nothing merged, nothing changed
    models.save_policy(pol, str(run / "ckpt0"), base_dir=str(run / "base"))
    assert not (run / "base").exists() and not any(f.startswith("base") for f in files(run / "ckpt0"))
    assert json.load(open(run / "ckpt0" / "policy.json"))["base"] == str(tmp_path / "m")
    randomize_lora(pol)
    pol.freeze_reference()                                            # a trained adapter merged: a new base
    randomize_lora(pol, seed=2)
    models.save_policy(pol, str(run / "ckpt1"), base_dir=str(run / "base"))
    stamp = os.stat(run / "base" / "model.safetensors").st_mtime_ns
    models.save_policy(pol, str(run / "ckpt2"), base_dir=str(run / "base"))
    assert os.stat(run / "base" / "model.safetensors").st_mtime_ns == stamp   # written once
    assert not any(f.startswith("base") for f in files(run / "ckpt2"))
    assert json.load(open(run / "ckpt2" / "policy.json"))["base"] == os.path.join("..", "base")
    back = models.load_policy(str(run / "ckpt2"), device="cpu").eval()
    eps = random_episodes(0, EPS)
    torch.testing.assert_close(forward(back, eps)[0], forward(pol.eval(), eps)[0], atol=1e-6, rtol=0)
    with back.reference(), pol.reference():
        torch.testing.assert_close(forward(back, eps)[0], forward(pol, eps)[0], atol=1e-6, rtol=0)


def test_a_full_finetune_checkpoint_holds_the_trained_weights_once_and_the_reference_once(make_policy, tmp_path):
    pol = make_policy(seed=2, full_finetune=True).eval()
    n_model = sum(p.numel() for p in pol.model.parameters())
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(0.01 * torch.randn_like(p))                        # trained: pi_theta != pi_ref
    run = tmp_path / "run"
    models.save_policy(pol, str(run / "ckpt"), base_dir=str(run / "base"))          # the random start: the reference, written once
    state = torch.load(run / "ckpt" / "policy.pt", weights_only=True)
    assert not any(k.startswith("ref_model.") for k in state)
    assert {k.removeprefix("model.") for k in state if k.startswith("model.")} == set(pol.model.state_dict())
    assert os.path.getsize(run / "ckpt" / "policy.pt") < 1.1 * 4 * n_model + 65536    # one fp32 copy (tied weights once)
    assert (run / "base" / "model.safetensors").exists() and not (run / "ckpt" / "base").exists()
    back = models.load_policy(str(run / "ckpt"), device="cpu").eval()
    eps = random_episodes(0, EPS)
    torch.testing.assert_close(forward(back, eps)[0], forward(pol, eps)[0], atol=1e-6, rtol=0)
    with back.reference(), pol.reference():
        torch.testing.assert_close(forward(back, eps)[0], forward(pol, eps)[0], atol=1e-6, rtol=0)


def test_full_finetuning_a_bf16_model_keeps_fp32_master_weights_that_small_steps_change(tiny_tok):
    import sft
    model, tok = models.build_tiny(0, tok=tiny_tok, **SMALL)
    pol = P.Policy(model.to(torch.bfloat16), tok, "tiny", full_finetune=True)
    assert all(p.dtype == torch.float32 for p in pol.model.parameters())             # master weights
    assert pol.compute_dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in pol.ref_model.parameters())
    eps = random_episodes(0, EPS)
    pol.eval()
    with pol.reference():
        ref = forward(pol, eps)[0]
    assert torch.equal(forward(pol, eps)[0], ref)                    # bf16 compute under autocast: pi_theta = pi_ref
    before = [p.detach().clone() for p in pol.model.parameters()]
    opt = torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    for _ in range(10):
        assert sft.sft_step(pol, opt, eps) is not None
    changed = sum(int((a != p.detach()).sum()) for a, p in zip(before, pol.model.parameters()))
    assert changed / sum(a.numel() for a in before) > 0.9            # bf16 weights: ~15 % changed


def test_a_run_started_from_another_runs_checkpoint_writes_its_own_base(make_policy, tmp_path):
    import shutil
    pol = make_policy(seed=2, full_finetune=True).eval()
    a, b = tmp_path / "a", tmp_path / "b"
    models.save_policy(pol, str(a / "checkpoint"), base_dir=str(a / "base"))
    start = models.load_policy(str(a / "checkpoint"), device="cpu").eval()
    start.freeze_reference()                                          # nothing moved: the base is unchanged
    models.save_policy(start, str(b / "checkpoint"), base_dir=str(b / "base"))
    assert (b / "base" / "model.safetensors").exists()                # b's own copy, not a's by absolute path
    assert json.load(open(b / "checkpoint" / "policy.json"))["base"] == os.path.join("..", "base")
    shutil.rmtree(a)
    eps = random_episodes(0, EPS)
    torch.testing.assert_close(forward(models.load_policy(str(b / "checkpoint"), device="cpu").eval(), eps)[0],
                               forward(start, eps)[0], atol=1e-6, rtol=0)


def test_a_checkpoint_reached_through_a_symlink_loads_the_base_beside_it(make_policy, tmp_path, monkeypatch):
    pol = make_policy(seed=2, full_finetune=True).eval()
    run = tmp_path / "runs" / "r"
    models.save_policy(pol, str(run / "checkpoint"), base_dir=str(run / "base"))
    (tmp_path / "best").symlink_to(run / "checkpoint")
    monkeypatch.chdir(tmp_path)
    back = models.load_policy("best", device="cpu").eval()
    eps = random_episodes(0, EPS)
    torch.testing.assert_close(forward(back, eps)[0], forward(pol, eps)[0], atol=1e-6, rtol=0)


def test_float16_full_finetuning_is_refused_for_want_of_a_loss_scaler(tiny_tok):
    model, tok = models.build_tiny(0, tok=tiny_tok, **SMALL)
    with pytest.raises(ValueError, match="loss scaler"):
        P.Policy(model.to(torch.float16), tok, "tiny", full_finetune=True)


def test_an_adapter_file_puts_the_lora_and_value_head_back_on_the_base_and_a_chain_merges_all_but_the_last(
        make_policy, tmp_path):
    def perturbed(seed):
        pol = make_policy(seed=0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in pol.lora_modules():
                m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.05)
            pol.v_head.weight.copy_(torch.randn(pol.v_head.weight.shape, generator=g))
        return pol
    ids = torch.tensor([[5, 9, 17, 23, 42, 8]])
    logits = lambda pol: pol.model(input_ids=ids).logits
    first, second = perturbed(1), perturbed(2)
    models.save_adapter(first, str(tmp_path / "a.safetensors")); models.save_adapter(second, str(tmp_path / "b.safetensors"))
    fresh = make_policy(seed=0)
    assert not torch.allclose(logits(fresh), logits(first))
    models.load_adapter(fresh, str(tmp_path / "a.safetensors"))
    assert torch.equal(logits(fresh), logits(first)) and torch.equal(fresh.v_head.weight, first.v_head.weight)
    # a then b: a merged into the base, b live on top (an SFT start, then an RL adapter)
    chained = make_policy(seed=0)
    models.load_adapter(chained, str(tmp_path / "a.safetensors"), merge=True)
    models.load_adapter(chained, str(tmp_path / "b.safetensors"))
    first.freeze_reference()
    for m, src in zip(first.lora_modules(), second.lora_modules()):
        m.A.data.copy_(src.A); m.B.data.copy_(src.B)
    assert torch.allclose(logits(chained), logits(first), atol=1e-6)
    with chained.reference():                # pi_ref of the chain is the merged first adapter
        assert not torch.allclose(logits(chained), logits(make_policy(seed=0)))
    other = make_policy(seed=0)
    other.lora_cfg = {**other.lora_cfg, "r": 2}
    with pytest.raises(ValueError, match="does not match"):
        models.load_adapter(other, str(tmp_path / "a.safetensors"))


def test_sampling_merges_each_lora_projection_into_one_matrix_up_to_rounding_and_leaves_w_untouched(make_policy):
    pol = make_policy().eval()
    randomize_lora(pol, scale=1.0)
    ids = torch.tensor([[5, 9, 17, 23, 42, 8]])
    weights = {n: p.clone() for n, p in pol.named_parameters()}
    with torch.no_grad():
        two_paths = pol.model(input_ids=ids).logits
        with rollout.merged_lora(pol):
            assert all(m.merged is not None for m in pol.lora_modules())
            merged = pol.model(input_ids=ids).logits
    assert torch.allclose(merged, two_paths, atol=1e-5) and not torch.equal(merged, two_paths)  # one matmul, not two
    assert all(m.merged is None for m in pol.lora_modules())
    assert all(torch.equal(weights[n], p) for n, p in pol.named_parameters())
    with pytest.raises(RuntimeError):        # an error while sampling leaves no merged copy behind
        with rollout.merged_lora(pol):
            raise RuntimeError
    assert all(m.merged is None for m in pol.lora_modules())
    fresh = make_policy()                    # B = 0: W itself (on CPU laid out [in, out]), the adapter's matmuls skipped
    with rollout.merged_lora(fresh):
        assert all(m.transposed and torch.equal(m.merged, m.base.weight.t()) and m.merged.is_contiguous()
                   for m in fresh.lora_modules())
    assert not any(m.transposed for m in fresh.lora_modules())


def test_a_policy_for_sampling_only_samples_the_same_tokens_reading_its_merged_weights_in_place(make_policy):
    """models.for_sampling_only (eval.py's policy): fp32 LoRA merged into W, W stored [in, out], so the sampler's
    merged_lora copies no weight; greedy and temperature-1 samples identical to the adapter's."""
    torch.manual_seed(0)
    pol = make_policy().eval()
    randomize_lora(pol, scale=0.3)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 2048, (n,), generator=g).tolist() for n in (7, 12, 5)]

    def sample():
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return rollout.generate(pol, prompts, 24, temperature=0), rollout.generate(pol, prompts, 24, temperature=1.0, generators=gens)
    before = sample()
    models.for_sampling_only(pol)
    with rollout.merged_lora(pol):
        assert all(m.merged.data_ptr() == m.base.weight.data_ptr() for m in pol.lora_modules())
    assert sample() == before
    half = make_policy()                                                   # bf16 weights: never merged, left as they are
    randomize_lora(half, scale=0.3)
    for m in half.lora_modules():
        m.base.to(torch.bfloat16)
    B = [m.B.clone() for m in half.lora_modules()]
    models.for_sampling_only(half)
    assert all(torch.equal(m.B, b) and not m.A0.numel() and m.base.weight.is_contiguous() for m, b in zip(half.lora_modules(), B))
