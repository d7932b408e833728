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
PREFILL_TOKENS = 4096              # contexts fed together, packed, up to this many tokens a forward


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
        t = len(self.state_end); self.state_end.append(len(self.ids) - 1)
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
            eps[i].add_action(t); n = len(eps[i].ids)
            if not done:  # a turn ended by max_new_tokens or an eos that is not the template's end of turn gets it
                eps[i].add_context(policy.encode_observation(envs[i].messages, ended=t[-1] == policy.eot_id))
            nxt.append(eps[i].ids[n:] if not done and fits(i) else None)
        on_done and None in nxt and on_done(nxt.count(None))
        return nxt

    was_training = policy.training; policy.eval()
    try:  # fp32 weights: one merged copy of the adapted weights for every turn of the batch (merged_lora)
        with torch.no_grad(), policy.autocast(), merged_lora(policy):
            _sample_turns(policy, batch_size or len(tasks), start, finish, max_new_tokens, temperature, top_p, gens, max_context)
    finally:
        policy.train(was_training)
    return eps, [e.traj for e in envs]


def expert_episode(policy, task, client):
    """A task's expert trajectory replayed through the server, as an Episode (SFT data): all its steps, however many."""
    e, ep = (task.world.Env if task.world else env.ToolEnv)(client, len(task.expert), observation_role=policy.obs_role), Episode()
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
    """Sampling without gradient, fp32 weights: each LoRA projection as one matrix W + (alpha / r) B A, up to rounding
    (~1e-7 relative), made once for all sampled inside (a batch of episodes), freed on exit; on CPU laid out [in, out]
    (MKL's x @ W^T ran 2-3x faster at 32 rows). bf16/fp16 weights are never merged (W + B A in bf16 keeps a few % of a
    small update: pi_ref plus rounding noise): they sample through PPO's two-path sum, with no copy of any weight."""
    mods = [m for m in policy.lora_modules() if m.enabled and m.merged is None and m.base.weight.dtype == torch.float32]
    try:
        with torch.no_grad():
            for m in mods:
                w = m.base.weight + m.delta() if bool(m.B.any()) or m.A0.numel() else m.base.weight.detach()
                m.transposed, m.merged = (True, w.t().contiguous()) if w.device.type == "cpu" else (False, w)
        yield
    finally:
        for m in mods:
            m.merged, m.transposed = None, False


def _sample_turns(policy, slots, start, finish, max_new_tokens, temperature, top_p, gens, max_context, logprobs=False):
    """The sampler's loop over up to `slots` episodes at once, each in a slot of the KV cache for all its turns (_Slots, or
    the model's kv_cache: harness.attention.RowCache). Each step samples one token of every episode, from its own generator,
    and feeds them in one batch; an episode whose turn ends leaves the step and finish() gives its next context, prefilled
    (with those of others and of new episodes) before the next step, or ends it, its slot going to start()'s next episode.
    A greedy batch's tail (<= DRAFT_ROWS rows) feeds each row's token with its prompt-lookup draft (_draft) in one forward.
    start() -> (i, prompt ids) or None; finish([(i, turn ids, their log-probs)]) -> [next context ids or None]."""
    kv, stats, stops = getattr(policy.model, "kv_cache", _Slots)(policy, slots, max_context), policy.gen_stats, set(policy.stop_ids)
    slot, turn, lps, logits, past, new = {}, {}, {}, {}, {}, {}                 # of each live episode i

    def prefill(new):  # {i: context}: fed packed, about PREFILL_TOKENS tokens a forward (else one by one: no padding)
        t, order = time.perf_counter(), sorted(new, key=slot.get)
        part = np.cumsum([len(new[i]) for i in order]) // PREFILL_TOKENS if kv.packs else range(len(order))   # each one's forward
        for i in order:    # past: the tokens before its turn (the slot holds them and all but the turn's last)
            past[i], turn[i], lps[i] = past.get(i, []) + turn.get(i, [])[:-1] + new[i], [], []
        for g in ([i for i, p in zip(order, part) if p == k] for k in sorted(set(part))):
            logits.update(zip(g, _forward(policy, kv, [slot[i] for i in g], [new[i] for i in g], max_new_tokens)))
        stats["prefill_s"] += time.perf_counter() - t; stats["prefill_tokens"] += sum(map(len, new.values()))
        new.clear()
    while True:
        while len(slot) < slots and (nxt := start()) is not None:
            slot[nxt[0]] = min(set(range(slots)) - set(slot.values())); new[nxt[0]] = nxt[1]
        prefill(new)
        if not slot:
            return
        kv.compact(slot)
        t, live = time.perf_counter(), sorted(slot, key=slot.get)
        z = torch.stack([logits[i] for i in live])                             # [b, V]
        tok = _sample(z, temperature, top_p, [gens[i] for i in live] if gens else None)   # [b]
        lp = F.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1).tolist() if logprobs else [None] * len(live)
        for i, k, p in zip(live, tok.tolist(), lp):
            turn[i].append(k); lps[i].append(p)
        done = {i for i in live if turn[i][-1] in stops or len(turn[i]) == max_new_tokens}   # turns that end here
        ended, go = [i for i in live if i in done], [i for i in live if i not in done]
        if go:   # each row's last token; in a greedy batch's tail (<= DRAFT_ROWS rows) with its prompt-lookup draft
            k = DRAFT_TOKENS // len(go) if len(go) <= DRAFT_ROWS and temperature == 0 and not logprobs else 0   # drafts' budget
            drafts = [_draft(past[i] + turn[i], min(k, max_new_tokens - len(turn[i]) - 1)) if k else [] for i in go]
            z = _forward(policy, kv, [slot[i] for i in go], [turn[i][-1:] + d for i, d in zip(go, drafts)], every=True)
            for i, d, zi in zip(go, drafts, z):                                # zi [1 + len(d), V]
                n = next((j for j, t in enumerate(d) if t != int(zi[j].argmax()) or t in stops), len(d))   # the drafts greedy confirms
                turn[i] += d[:n]; logits[i] = zi[n]
                kv.n[slot[i]] -= len(d) - n; stats["decode_tokens"] += n       # rejected drafts' keys: overwritten
        stats["decode_s"] += time.perf_counter() - t; stats["decode_tokens"] += len(live)
        for i, nxt in zip(ended, finish([(i, turn[i], lps[i]) for i in ended]) if ended else []):
            if nxt is None:                                                    # ended: its slot and state freed
                kv.n[slot.pop(i)] = 0
                for state in (turn, lps, logits, past):
                    del state[i]
            else:
                new[i] = turn[i][-1:] + nxt                                    # the turn's last token: sampled, not yet fed


def _draft(seq, k, n=3):
    """Prompt lookup decoding (Saxena, 2023): the <= k tokens that followed the last earlier occurrence of seq's
    last n tokens. A follower cut short by seq's end is a period of the text, repeated up to k (looking up again
    after it finds the same). Each one the greedy choice confirms is a token decoded without a forward of its own."""
    d = next((seq[j + n:j + n + k] for j in range(len(seq) - n - 1, -1, -1) if seq[j:j + n] == seq[-n:]), []) if k > 0 else []
    return (d * (k // len(d) + 1))[:k] if d else d


def _forward(policy, kv, rows, ids, room=0, every=False):
    """ids: a token list for each episode in slots `rows` (ascending), fed together, leaving room for `room` more -> each
    row's next-token logits [b, V] (every: at each of its tokens, [q_r, V] a row) as PPO's forward makes them (policy.logits);
    each token attends to its row up to it. Rows of several lengths go packed in one sequence where the model's attention
    reads them so (harness.attention), else padded with tokens 0, as is a slot between the rows (overwritten later)."""
    lo, hi, q, lens = rows[0], rows[-1] + 1, max(map(len, ids)), dict(zip(rows, map(len, ids)))
    packed, feed, at, start = len(set(lens.values())) > 1 and kv.packs, dict(zip(rows, ids)), [], {}
    for r in range(lo, hi):   # each fed token's (slot, position); a slot between the rows: nothing packed, pads padded
        feed[r] = feed.get(r, []) + [0] * (0 if packed else q - lens.get(r, 0))
        start[r] = len(at); at += [(r, kv.n[r] + j) for j in range(len(feed[r]))]
        kv.n[r] += lens.get(r, 0)
    kv.at = (lo, hi) + torch.tensor(at, device=policy.device).view(1 if packed else hi - lo, -1, 2).unbind(-1)   # [b, q] each
    pos, kv.L = kv.at[3], max(p for _, p in at) + 1; kv.past = max(kv.L - pos.shape[1], 0)   # past: tokens before the query
    kv.grow(kv.L + room, hi)   # a mask: [b, L] (padding) for one token a row, [b, 1, q, L] (used as is) for more; one row: none
    keys, (w, mixed) = torch.arange(kv.L, device=pos.device), getattr(policy.model, "window", (None, False))
    mask = None if hi - lo == 1 else (keys <= pos[..., None])[:, 0 if pos.shape[1] == 1 and not w else None]
    if w and mask is not None:   # sliding layers: each row's own window, keys in (position - w, position]
        win = mask & (keys > pos[..., None] - w)[:, None]; mask = {"full_attention": mask, "sliding_attention": win} if mixed else win
    h = policy.model.base_model(input_ids=torch.tensor(sum(map(feed.get, range(lo, hi)), []), device=pos.device).view(pos.shape),
                                attention_mask=mask, position_ids=pos, cache=kv, use_cache=True,
                                **({"rows_q": [len(feed[r]) for r in range(lo, hi)]} if packed else {})).last_hidden_state
    z = policy.logits(h.flatten(0, 1)[[start[r] + j for r, n in lens.items() for j in (range(n) if every else [n - 1])]])
    return z.split(list(lens.values())) if every else z               # [q_r, V] a row, or [b, V]


class _Slots(Cache):
    """Keys and values of up to S episodes for all their turns: per layer [R, H, capacity, D] buffers, slot s holding
    its episode's first n[s] tokens (right padding), grown 1.5x when a turn needs more room (up to max_context), R then
    the slots in use (a long tail of a few episodes grows only theirs). Sliding-window attention is exact within the window."""

    def __init__(self, policy, S, max_context):
        self.S, self.n, self.cap, self.limit, self.at, self.L, self.past = S, [0] * S, 0, max_context or 1 << 62, None, 0, 0
        self.packs = getattr(policy.model, "packs_rows", False)   # its attention reads rows packed in one sequence
        super().__init__(layers=[_SlotLayer(self) for _ in range(policy.model.config.get_text_config().num_hidden_layers)])

    def grow(self, need, hi):   # room for `need` tokens in rows 0..R-1: up to hi and every slot that holds tokens
        self.cap = max(need, min(self.cap * 3 // 2, self.limit)) if need > self.cap else self.cap
        self.R = max(hi, 1 + max((s for s, n in enumerate(self.n) if n), default=-1))

    def compact(self, slot):
        """Live slots back to 0..m-1: each in a slot at or above m moves into a free one below (a copy of its tokens)."""
        m, used = len(slot), set(slot.values())
        for i, s in zip([i for i in slot if slot[i] >= m], sorted(set(range(m)) - used)):
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
        self.bk[rows, :, at], self.bv[rows, :, at] = k.transpose(1, 2), v.transpose(1, 2)   # each token: its slot, position
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
    cdf, u = p.cumsum(-1), torch.stack([torch.rand((), generator=g) for g in gens]) if gens else torch.rand(len(p))
    u = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)                          # [b, 1], scaled to the kept mass
    k = torch.searchsorted(cdf, u).clamp(max=p.shape[-1] - 1)
    return (k if idx is None else idx.gather(-1, k)).squeeze(-1)
