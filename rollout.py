"""Batched multi-turn rollouts: many tool-use episodes at once, sampled from the policy (paper Sec. 3, 4.2).

Each turn, the next assistant turn of every live episode is sampled in one batch (`generate`), the
environments step with their tool calls running concurrently (env.step_all), and each episode's
token ids grow by the sampled action and the observation. An episode ends at Finish, at max_steps, or
when its next turn could not fit in max_context tokens (then it ends unsolved and keeps every
completed step; nothing is dropped silently).

    Episode.ids        [T] prompt, action and observation tokens, in order
    Episode.act        [T] True where the policy sampled the token: the only tokens with gradient
    Episode.step       [T] step index t of each action token, -1 elsewhere
    Episode.state_end  [S] position of the last token of state s_t, where V(s_t) is read

The sampler, `generate`: the KV cache with left padding, temperature / top-p, one uniform draw per
token from each episode's own generator, so an episode's randomness depends on (seed, iteration,
episode) only, not on what else is in the batch; given each episode's cache from its previous turn,
a turn computes only its new tokens. It samples what PPO's forward computes: fp32 weights through
W + B A merged once per batch of rollouts (`merged_lora`), bf16/fp16 weights never merged (most of a
small B A would round away) but through the same two-path sum as the update.

Departures from the original code:
1. The original trains offline only, on fixed trajectories; here rollouts are online and the same
   episodes carry the old log-probs (computed by ppo.prepare) that PPO's ratio needs.
"""
import contextlib
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

import env


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
    """Run `tasks` as parallel episodes -> (episodes, trajectories), in task order.
    Tool responses go in the chat template's role for them (policy.obs_role) unless told otherwise.
    batch_size: at most this many episodes at once (0 = all); a finished episode's place goes to the
    next task at the next turn, so a few long episodes do not leave the batch nearly empty.
    on_done(n): called with the number of episodes that ended at each turn (a progress bar)."""
    envs = [env.ToolEnv(client, max_steps, obs_chars, observation_role or policy.obs_role) for _ in tasks]
    eps = [Episode() for _ in tasks]
    gens = [episode_generator(seed, iteration, first_episode + i) for i in range(len(tasks))]
    live, waiting = [], iter(range(len(tasks)))
    caches = [None] * len(tasks)  # each episode's keys and values: a turn computes only its new tokens
    was_training = policy.training
    policy.eval()
    try:
        # fp32 weights: one merged copy of the adapted weights for every turn of the batch (merged_lora)
        with merged_lora(policy):
            while True:
                for i in itertools.islice(waiting, max(0, (batch_size or len(tasks)) - len(live))):
                    eps[i].add_context(policy.encode_prompt(envs[i].reset(tasks[i])))
                    live.append(i)
                for i in live:
                    if len(eps[i].ids) + max_new_tokens > max_context:
                        envs[i].end("max_context")  # the next turn cannot fit: unsolved, completed steps kept
                live = _still_live(live, envs, on_done)
                if not live:
                    if len(envs) == sum(e.done for e in envs):
                        break
                    continue
                kv = [caches[i] for i in live]
                outs = generate(policy, [eps[i].ids for i in live], max_new_tokens, temperature, top_p,
                                [gens[i] for i in live], kv)
                results = env.step_all(client, [envs[i] for i in live], [policy.decode_action(o) for o in outs])
                for i, out, c, (_, done, _) in zip(live, outs, kv, results):
                    eps[i].add_action(out)
                    caches[i] = None if done else c
                    if not done:
                        # a turn that stopped at max_new_tokens, or at an eos that is not the template's end of turn,
                        # gets the template's end-of-turn token as context
                        eps[i].add_context(policy.encode_observation(envs[i].messages, ended=out[-1] == policy.eot_id))
                live = _still_live(live, envs, on_done)
    finally:
        policy.train(was_training)
    return eps, [e.traj for e in envs]


def _still_live(live, envs, on_done):
    out = [i for i in live if not envs[i].done]
    if on_done and len(out) < len(live):
        on_done(len(live) - len(out))
    return out


def expert_episode(policy, task, client):
    """A task's expert trajectory replayed through the server, as an Episode (SFT data)."""
    e, ep = env.ToolEnv(client, observation_role=policy.obs_role), Episode()
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
def generate(policy, prompts, max_new_tokens=256, temperature=1.0, top_p=1.0, generators=None, caches=None,
             logprobs=False):
    """Next turn of each prompt (lists of token ids), batched with the KV cache and left padding.

    Returns the sampled ids of each row, ending with a stop token unless max_new_tokens hit.
    temperature 0 = greedy. generators: one torch.Generator per row (CPU), for sampling.
    caches: optional list, one entry per row, None or (n, [(k, v)] per layer) holding the keys and
    values of the row's first n prompt tokens (its earlier turns); on return each entry holds the
    row's prompt and sampled turn (all but the last token), ready for the row's next turn.
    logprobs: also return each sampled token's log-probability under the policy (temperature 1,
    no top-p), as PPO computes it: (ids, logps), the check that sampler and update agree.
    Adds its time and tokens to policy.gen_stats.
    """
    with policy.autocast(), merged_lora(policy):
        return _generate(policy, prompts, max_new_tokens, temperature, top_p, generators, caches, logprobs)


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


def _generate(policy, prompts, max_new_tokens, temperature, top_p, generators, caches, logprobs=False):
    dev, B = policy.device, len(prompts)
    caches = caches if caches is not None else [None] * B
    # prefill one row at a time: without padding, attention takes its causal kernel; a cached row
    # computes only its new tokens (the last sampled token of its previous turn and the observation)
    rows_kv, logits = [], []
    t0 = time.perf_counter()
    for p, c in zip(prompts, caches):
        n, past = c if c is not None else (0, None)
        if n >= len(p):
            raise ValueError(f"a row's cache holds {n} tokens but its prompt has only {len(p)}: caches are for a next turn")
        cache = DynamicCache(past) if past else DynamicCache()
        out = policy.model(input_ids=torch.tensor([p[n:]], device=dev), position_ids=torch.arange(n, len(p), device=dev)[None],
                           cache=cache, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[0, -1].float())
        rows_kv.append([(layer.keys, layer.values) for layer in cache.layers])
    # stack the rows left-padded into buffers sized for the whole turn: decoding copies no cache
    L, lens = max(map(len, prompts)), [len(p) for p in prompts]
    layers = []
    for kv in zip(*rows_kv):                                           # one layer, every row
        k0 = kv[0][0]
        bk = k0.new_zeros(B, k0.shape[1], L + max_new_tokens, k0.shape[3]); bv = torch.zeros_like(bk)
        for r, (k, v) in enumerate(kv):
            bk[r, :, L - lens[r]:L], bv[r, :, L - lens[r]:L] = k[0], v[0]
        layers.append(_TurnBuffer(bk, bv, L))
    cache = Cache(layers=layers)
    mask = torch.tensor([[0] * (L - n) + [1] * n for n in lens], device=dev)   # [B, L]
    logits, pos = torch.stack(logits), torch.tensor(lens, device=dev)[:, None] - 1  # [B, V], [B, 1]
    rows, outs, lps = list(range(B)), [[] for _ in range(B)], [[] for _ in range(B)]
    stop = torch.tensor(policy.stop_ids, device=dev)
    t1 = time.perf_counter()
    policy.gen_stats["prefill_s"] += t1 - t0
    policy.gen_stats["prefill_tokens"] += sum(len(p) - (c[0] if c is not None else 0) for p, c in zip(prompts, caches))

    def keep_cache(j, r):  # row r (at batch index j) is done: its keys and values for the next turn
        m = layers[0].n
        caches[r] = (m - (L - lens[r]), [(l.bk[j:j + 1, :, L - lens[r]:m].clone(), l.bv[j:j + 1, :, L - lens[r]:m].clone())
                                         for l in layers])

    for step in range(max_new_tokens):
        nxt = _sample(logits, temperature, top_p, [generators[r] for r in rows] if generators else None)  # [b]
        done = torch.isin(nxt, stop).tolist()
        for r, tok_id in zip(rows, nxt.tolist()):
            outs[r].append(tok_id)
        if logprobs:
            for r, lp in zip(rows, F.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1).tolist()):
                lps[r].append(lp)
        if step == max_new_tokens - 1:
            done = [True] * len(rows)
        for j, d in enumerate(done):
            if d:
                keep_cache(j, rows[j])
        keep = [i for i, d in enumerate(done) if not d]
        if not keep:
            break
        if len(keep) < len(rows):  # drop finished rows from the batch and the cache
            k = torch.tensor(keep, device=dev)
            cache.batch_select_indices(k)
            nxt, mask, pos, rows = nxt[k], mask[k], pos[k], [rows[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        pos = pos + 1
        out = policy.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                           cache=cache, use_cache=True)
        logits = out.logits[:, -1].float()
    policy.gen_stats["decode_s"] += time.perf_counter() - t1
    policy.gen_stats["decode_tokens"] += sum(map(len, outs))
    return (outs, lps) if logprobs else outs


class _TurnBuffer(DynamicLayer):
    """One layer's keys and values for a turn: a buffer with room for every new token, filled up to n
    (transformers' DynamicCache concatenates, copying the whole cache for every sampled token)."""

    def __init__(self, bk, bv, n):  # bk, bv: [B, H, capacity, D]
        super().__init__()
        self.bk, self.bv, self.n, self.is_initialized = bk, bv, n, True
        self.dtype, self.device = bk.dtype, bk.device
        self.keys, self.values = bk[:, :, :n], bv[:, :, :n]

    def update(self, k, v, *args, **kwargs):
        q = k.shape[2]
        self.bk[:, :, self.n:self.n + q], self.bv[:, :, self.n:self.n + q] = k, v
        self.n += q
        self.keys, self.values = self.bk[:, :, :self.n], self.bv[:, :, :self.n]
        return self.keys, self.values

    def get_seq_length(self):
        return self.n

    def batch_select_indices(self, idx):
        self.bk, self.bv = self.bk[idx], self.bv[idx]
        self.keys, self.values = self.bk[:, :, :self.n], self.bv[:, :, :self.n]


def _sample(logits, temperature, top_p, gens):
    """One token per row; inverse-CDF sampling with one uniform per row from its own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    p = F.softmax(logits / temperature, -1)                                   # [b, V]
    idx = None
    if top_p < 1.0:                                                           # (a sort costs more than the model at small b)
        p, idx = p.sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)                      # nucleus: smallest set with mass >= top_p
    cdf = p.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in gens]) if gens else torch.rand(len(p))
    u = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)                          # [b, 1], scaled to the kept mass
    k = torch.searchsorted(cdf, u).clamp(max=p.shape[-1] - 1)
    return (k if idx is None else idx.gather(-1, k)).squeeze(-1)
