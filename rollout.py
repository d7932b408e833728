"""Batched multi-turn rollouts: many tool-use episodes at once, sampled from the policy (paper Sec. 3, 4.2).

Every live episode samples its next token and all are fed in one batch; an episode's keys and values stay
in its slot of one KV cache for all its turns (`_sample_turns`). When a turn ends, the environment steps
(the tool calls of turns that end together run concurrently, env.step_all), the episode's ids grow by the
action and the observation, and the observation is prefilled into its slot. An episode ends at Finish, at
max_steps, or when its next turn could not fit in max_context tokens (unsolved, its completed steps kept).

    Episode.ids        [T] prompt, action and observation tokens, in order
    Episode.act        [T] True where the policy sampled the token: the only tokens with gradient
    Episode.step       [T] step index t of each action token, -1 elsewhere
    Episode.state_end  [S] position of the last token of state s_t, where V(s_t) is read

The sampler: temperature / top-p, one uniform draw per token from each episode's own generator, so its
randomness depends on (seed, iteration, episode) only, not on the batch. It samples what PPO's forward
computes: fp32 weights through W + B A merged once per batch of rollouts (`merged_lora`), bf16/fp16
weights never merged (most of a small B A would round away) but through the update's two-path sum.

Departures from the original code:
1. The original trains offline only, on fixed trajectories; here rollouts are online and the same
   episodes carry the old log-probs (computed by ppo.prepare) that PPO's ratio needs.
"""
import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

import env

DRAFT_ROWS, DRAFT_TOKENS = 8, 128   # prompt lookup when at most this many greedy rows are left, drafting this many tokens


@dataclass
class Episode:
    ids: list = field(default_factory=list)
    act: list = field(default_factory=list)
    step: list = field(default_factory=list)
    state_end: list = field(default_factory=list)
    rewards: list = field(default_factory=list)  # [S] r_t, filled from reward.py

    def add_context(self, tokens):  # prompt or observation: never gets gradient
        self.ids += tokens; self.act += [False] * len(tokens); self.step += [-1] * len(tokens)

    def add_action(self, tokens):   # the action a_t of step t; s_t ends on the token before it
        t = len(self.state_end)
        self.state_end.append(len(self.ids) - 1)
        self.ids += tokens; self.act += [True] * len(tokens); self.step += [t] * len(tokens)

    @property
    def n_steps(self):
        return len(self.state_end)


def episode_generator(seed, iteration, episode):
    """The sampling randomness of one episode: a function of (seed, iteration, episode) only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, iteration, episode]).generate_state(1)[0]))


def rollout(policy, tasks, client, seed=0, iteration=0, first_episode=0, max_steps=12, max_new_tokens=256,
            max_context=4096, temperature=1.0, top_p=1.0, obs_chars=1024, observation_role=None, batch_size=0,
            on_done=None):
    """Run `tasks` as parallel episodes -> (episodes, trajectories), in task order. Tool responses go in the chat
    template's role for them (policy.obs_role) unless told otherwise. batch_size: at most this many episodes at
    once (0 = all), an ended one's place going to the next task at once. on_done(n): n episodes ended (a progress bar)."""
    envs = [(t.world.Env if t.world else env.ToolEnv)(client, max_steps, obs_chars, observation_role or policy.obs_role) for t in tasks]
    eps, waiting = [Episode() for _ in tasks], iter(range(len(tasks)))
    gens = [episode_generator(seed, iteration, first_episode + i) for i in range(len(tasks))]

    def fits(i):  # the next turn fits in max_context, else the episode ends unsolved, its completed steps kept
        return len(eps[i].ids) + max_new_tokens <= max_context or envs[i].end("max_context")

    def start():  # the next task whose first turn fits: (i, its prompt), or None
        for i in waiting:
            eps[i].add_context(policy.encode_prompt(envs[i].reset(tasks[i])))
            if fits(i):
                return i, eps[i].ids
            on_done and on_done(1)

    def finish(turns):  # [(i, sampled turn, _)]: the environments step together -> each one's next context or None
        results, nxt = env.step_all(client, [envs[i] for i, _, _ in turns], [policy.decode_action(t) for _, t, _ in turns]), []
        for (i, t, _), (_, done, _) in zip(turns, results):
            eps[i].add_action(t)
            n = len(eps[i].ids)
            if not done:  # a turn ended by max_new_tokens or an eos that is not the template's end of turn gets it
                eps[i].add_context(policy.encode_observation(envs[i].messages, ended=t[-1] == policy.eot_id))
            nxt.append(eps[i].ids[n:] if not done and fits(i) else None)
        on_done and None in nxt and on_done(nxt.count(None))
        return nxt

    was_training = policy.training; policy.eval()
    try:  # fp32 weights: one merged copy of the adapted weights for every turn of the batch (merged_lora)
        with torch.no_grad(), policy.autocast(), merged_lora(policy):
            _sample_turns(policy, batch_size or len(tasks), start, finish, max_new_tokens, temperature, top_p,
                          gens, max_context)
    finally:
        policy.train(was_training)
    return eps, [e.traj for e in envs]


def expert_episode(policy, task, client):
    """A task's expert trajectory replayed through the server, as an Episode (SFT data)."""
    e, ep = (task.world.Env if task.world else env.ToolEnv)(client, observation_role=policy.obs_role), Episode()
    ep.add_context(policy.encode_prompt(e.reset(task)))
    for s in task.expert:
        text = env.format_action(s["thought"], s["name"], s["arguments"])
        _, done, _ = e.step(text)
        ep.add_action(policy.encode_action(text))
        if not done:
            ep.add_context(policy.encode_observation(e.messages, ended=True))
    return ep, e.traj


# ---- the sampler ------------------------------------------------------------------------------
@torch.no_grad()
def generate(policy, prompts, max_new_tokens=256, temperature=1.0, top_p=1.0, generators=None, logprobs=False):
    """One turn for each prompt (lists of token ids), sampled together -> the sampled ids of each, ending with
    a stop token unless max_new_tokens hit. temperature 0 = greedy. generators: one torch.Generator per row.
    logprobs: also return each sampled token's log-probability under the policy (temperature 1, no top-p),
    as PPO computes it: (ids, logps), the check that sampler and update agree."""
    outs, lps, todo = [None] * len(prompts), [None] * len(prompts), iter(enumerate(prompts))

    def finish(turns):
        for i, t, lp in turns:
            outs[i], lps[i] = t, lp
        return [None] * len(turns)
    with policy.autocast(), merged_lora(policy):
        _sample_turns(policy, len(prompts), lambda: next(todo, None), finish, max_new_tokens, temperature, top_p,
                      generators, None, logprobs)
    return (outs, lps) if logprobs else outs


@contextlib.contextmanager
def merged_lora(policy):
    """Sampling without gradient, fp32 weights: each LoRA projection as one matrix W + (alpha / r) B A (the
    adapter's three small matmuls a token took as long as W x), up to rounding (~1e-7 relative); made once
    for everything sampled inside (rollout() enters it around a batch of episodes), freed on exit. On CPU
    it is laid out [in, out] (one copy): at 32 rows MKL's x @ W^T ran 2-3x faster than F.linear's [out, in].
    bf16/fp16 weights are never merged (W + B A in bf16 keeps a few % of a small update: the policy would
    sample pi_ref plus rounding noise): they sample through PPO's two-path sum, with no copy of any weight."""
    mods = [m for m in policy.lora_modules() if m.enabled and m.merged is None and m.base.weight.dtype == torch.float32]
    try:
        with torch.no_grad():
            for m in mods:
                w = m.base.weight + m.delta() if bool(m.B.any()) or m.A0.numel() else m.base.weight.detach()
                m.transposed = w.device.type == "cpu"
                m.merged = w.t().contiguous() if m.transposed else w
        yield
    finally:
        for m in mods:
            m.merged, m.transposed = None, False


def _sample_turns(policy, slots, start, finish, max_new_tokens, temperature, top_p, gens, max_context, logprobs=False):
    """The sampler's loop over up to `slots` episodes at once, each in a slot of one KV cache (_Slots) for all its
    turns. Each step samples one token of every episode, from its own generator, and feeds them in one batch;
    an episode whose turn ends leaves the step and finish() gives its next context, prefilled alone (no padding)
    before the next step, or ends it, its slot going to start()'s next episode: no episode waits for another.
    A greedy batch's tail (<= DRAFT_ROWS rows) feeds each row's token with its prompt-lookup draft (_draft) in one forward.
    start() -> (i, prompt ids) or None; finish([(i, turn ids, their log-probs)]) -> [next context ids or None]."""
    dev, kv, stats, stops = policy.device, _Slots(policy, slots, max_context), policy.gen_stats, set(policy.stop_ids)
    slot, turn, lps, logits, past = {}, {}, {}, {}, {}                         # of each live episode i

    def prefill(i, ids):  # past: the tokens before its turn (the slot holds them and all but the turn's last)
        t = time.perf_counter()
        past[i] = past.get(i, []) + turn.get(i, [])[:-1] + ids
        logits[i], turn[i], lps[i] = _forward(policy, kv, [slot[i]], torch.tensor([ids], device=dev), max_new_tokens)[0], [], []
        stats["prefill_s"] += time.perf_counter() - t; stats["prefill_tokens"] += len(ids)
    while True:
        while len(slot) < slots and (nxt := start()) is not None:
            slot[nxt[0]] = min(set(range(slots)) - set(slot.values()))
            prefill(*nxt)
        if not slot:
            return
        kv.compact(slot)
        t, live = time.perf_counter(), sorted(slot, key=slot.get)
        z = torch.stack([logits[i] for i in live])                             # [b, V]
        tok = _sample(z, temperature, top_p, [gens[i] for i in live] if gens else None)   # [b]
        for i, lp in zip(live, F.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1).tolist() if logprobs else []):
            lps[i].append(lp)
        for i, k in zip(live, tok.tolist()):
            turn[i].append(k)
        done = {i for i in live if turn[i][-1] in stops or len(turn[i]) == max_new_tokens}   # turns that end here
        ended, go = [i for i in live if i in done], [i for i in live if i not in done]
        if go and len(go) <= DRAFT_ROWS and temperature == 0 and not logprobs:  # a greedy batch's tail: prompt lookup
            drafts = [_draft(past[i] + turn[i], min(DRAFT_TOKENS // len(go), max_new_tokens - len(turn[i]) - 1)) for i in go]
            ids = [turn[i][-1:] + d + [0] * (max(map(len, drafts)) - len(d)) for i, d in zip(go, drafts)]   # pads: token 0
            z = _forward(policy, kv, [slot[i] for i in go], torch.tensor(ids, device=dev), every=True)     # [b, q, V]
            for i, d, zi, g in zip(go, drafts, z, z.argmax(-1).tolist()):
                n = next((j for j, t in enumerate(d) if t != g[j] or t in stops), len(d))   # the drafts greedy confirms
                turn[i] += d[:n]; logits[i] = zi[n]
                kv.n[slot[i]] -= len(ids[0]) - 1 - n; stats["decode_tokens"] += n   # rejected drafts' and pads' keys: overwritten
        elif go:
            logits.update(zip(go, _forward(policy, kv, [slot[i] for i in go], torch.tensor([[turn[i][-1]] for i in go], device=dev))))
        stats["decode_s"] += time.perf_counter() - t; stats["decode_tokens"] += len(live)
        for i, nxt in zip(ended, finish([(i, turn[i], lps[i]) for i in ended]) if ended else []):
            if nxt is None:                                                    # ended: its slot and state freed
                kv.n[slot.pop(i)] = 0
                for state in (turn, lps, logits, past):
                    del state[i]
            else:
                prefill(i, turn[i][-1:] + nxt)                                 # the turn's last token: sampled, not yet fed


def _draft(seq, k, n=3):
    """Prompt lookup decoding (Saxena, 2023): the <= k tokens that followed the last earlier occurrence of seq's
    last n tokens. A follower cut short by seq's end is a period of the text, repeated up to k (looking up again
    after it finds the same). Each one the greedy choice confirms is a token decoded without a forward of its own."""
    d = next((seq[j + n:j + n + k] for j in range(len(seq) - n - 1, -1, -1) if seq[j:j + n] == seq[-n:]), []) if k > 0 else []
    return (d * (k // len(d) + 1))[:k] if d else d


def _forward(policy, kv, rows, ids, room=0, every=False):
    """ids [b, q] fed to the episodes in slots `rows` (ascending), leaving room for `room` more -> each row's next-token
    logits [b, V] (every: at each of its q, [b, q, V]) as PPO's forward makes them (policy.logits); each token attends
    to its row up to it. A slot between the rows gets q tokens 0 at its next positions (its next real tokens overwrite them)."""
    lo, hi, q, pick = rows[0], rows[-1] + 1, ids.shape[1], [r - rows[0] for r in rows]
    ids = ids.new_zeros(hi - lo, q).index_copy_(0, torch.tensor(pick, device=ids.device), ids) if hi - lo > len(rows) else ids
    pos = torch.tensor(kv.n[lo:hi], device=ids.device)[:, None] + torch.arange(q, device=ids.device)   # [b, q]
    kv.at, kv.L = (lo, hi, torch.arange(lo, hi, device=ids.device), pos), int(pos.max()) + 1
    kv.past = kv.L - q                                                     # tokens before the query (mask sizes)
    kv.grow(kv.L + room, hi)   # a mask: [b, L] (padding) for one token a row, [b, 1, q, L] (used as is) for more; one row: none
    mask = None if hi - lo == 1 else (torch.arange(kv.L, device=ids.device) <= pos[..., None])[:, 0 if q == 1 else None]
    h = policy.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=kv, use_cache=True).last_hidden_state
    for r in rows:
        kv.n[r] += q
    return policy.logits(h[pick] if every else h[pick, -1])


class _Slots(Cache):
    """Keys and values of up to S episodes for all their turns: per layer [R, H, capacity, D] buffers, slot s holding
    its episode's first n[s] tokens (right padding), grown 1.5x when a turn needs more room (up to max_context), R then
    the slots in use (a long tail of a few episodes grows only theirs). Sliding-window attention is exact within the window."""

    def __init__(self, policy, S, max_context):
        self.S, self.n, self.cap, self.limit, self.at, self.L, self.past = S, [0] * S, 0, max_context or 1 << 62, None, 0, 0
        super().__init__(layers=[_SlotLayer(self) for _ in range(policy.model.config.get_text_config().num_hidden_layers)])

    def grow(self, need, hi):   # room for `need` tokens in rows 0..R-1: up to hi and every slot that holds tokens
        if need > self.cap:
            self.cap = max(need, min(self.cap * 3 // 2, self.limit))
        self.R = max(hi, 1 + max((s for s, n in enumerate(self.n) if n), default=-1))

    def compact(self, slot):
        """Live slots back to 0..m-1: each in a slot at or above m moves into a free one below (a copy of its tokens)."""
        m = len(slot)
        holes = sorted(set(range(m)) - set(slot.values()))
        for i, s in zip([i for i in slot if slot[i] >= m], holes):
            a, n = slot[i], self.n[slot[i]]
            for layer in self.layers:
                layer.bk[s, :, :n], layer.bv[s, :, :n] = layer.bk[a, :, :n], layer.bv[a, :, :n]
            self.n[s], self.n[a], slot[i] = n, 0, s


class _SlotLayer(DynamicLayer):
    """One layer of _Slots: writes each fed token's keys and values at its row's position, returns the rows' buffers."""

    def __init__(self, kv):
        super().__init__()
        self.kv, self.bk, self.bv, self.is_initialized = kv, None, None, True

    def update(self, k, v, *args, **kwargs):
        kv, (lo, hi, rows, at) = self.kv, self.kv.at
        old = 0 if self.bk is None else len(self.bk)       # rows: all S when more are in use, else (growing) those in use
        if old < kv.R or self.bk.shape[2] < kv.cap:         # zeros: a masked position must not hold a NaN (0 x NaN)
            bk = k.new_zeros(kv.S if old < kv.R else kv.R, k.shape[1], kv.cap, k.shape[3]); bv = torch.zeros_like(bk, dtype=v.dtype)
            if old:                                         # (under autocast k is fp32 (rotary), v not)
                bk[:old, :, :self.bk.shape[2]], bv[:old, :, :self.bk.shape[2]] = self.bk[:len(bk)], self.bv[:len(bk)]
            self.bk, self.bv = bk, bv
        if hi - lo == 1:                                   # one row, its q tokens after its kv.past
            self.bk[lo, :, kv.past:kv.L], self.bv[lo, :, kv.past:kv.L] = k[0], v[0]
        else:                                              # q tokens per row, each at its own position
            self.bk[rows[:, None], :, at], self.bv[rows[:, None], :, at] = k.transpose(1, 2), v.transpose(1, 2)
        return self.bk[lo:hi, :, :kv.L], self.bv[lo:hi, :, :kv.L]

    def get_seq_length(self):
        return self.kv.past


def _sample(logits, temperature, top_p, gens):
    """One token per row; inverse-CDF sampling with one uniform per row from its own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    p = F.softmax(logits / temperature, -1)                                   # [b, V]
    p, idx = p.sort(-1, descending=True) if top_p < 1.0 else (p, None)       # (a sort costs more than the model at small b)
    p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0) if top_p < 1.0 else p    # nucleus: smallest set with mass >= top_p
    cdf = p.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in gens]) if gens else torch.rand(len(p))
    u = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)                          # [b, 1], scaled to the kept mass
    k = torch.searchsorted(cdf, u).clamp(max=p.shape[-1] - 1)
    return (k if idx is None else idx.gather(-1, k)).squeeze(-1)
