"""Step-grained PPO (paper Sec. 4.2), by hand.

Letters used in shape comments: B episodes, S steps (tool-call turns) of an episode, T tokens,
N action tokens (sampled by the policy), U advantage units (steps, or action tokens with
--advantage token), V vocabulary.

For a batch of episodes with step rewards r_t (reward.py) and, from `prepare`, old log-probs
log pi_old, reference log-probs log pi_ref and values V(s_t) read at the last token of each state:

  KL penalty     r_t <- r_t - beta * sum_{k in a_t} (log pi_old(k) - log pi_ref(k))     (k1 estimator)
  TD error       delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   V(s_{S}) = 0            Sec. 4.2
  advantage      A_t = sum_l (gamma * lam)^l delta_{t+l}                               Sec. 4.2
  return         R_t = A_t + V(s_t)
  every action token of step t gets A_t; prompt and observation tokens get no gradient.
  policy loss    mean over the action tokens of an optimizer step's episodes (each token weighs
                 the same, whatever mini-batch it fell in) of max(-A rho, -A clip(rho, 1-eps, 1+eps)),
                 rho = pi_theta / pi_old                                               Sec. 4.2
  value loss     0.5 * mean over that optimizer step's units of max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)
  KL coef beta   adaptive (Ziegler et al. 2019): beta *= 1 + clip(KL/target - 1, +-0.2) * B/horizon
Every forward pass (prepare and update) runs without dropout, so rho is 1 until the first optimizer
step: bit for bit when an optimizer step takes the whole batch (the defaults), else up to rounding.

Its benchmark (update time, tokens/s, memory) is bench.py. On several ranks (torchrun; dist.py) the
same update runs on each rank's share of the batch, with the batch statistics and gradients reduced
over ranks: `ranks` (a dist.Ranks) is passed in, never global; one process passes none.

Departures from the original code (StepTool's subclass of trl's PPOTrainer, 0.10 / 0.11):
1. GAE runs over steps, not tokens: the original runs it per token through tool-response tokens
   (reward 0, value 0 there), so credit for a later step decays by (gamma*lam)^(tokens between).
   Its variant is kept as --advantage token (rewards on each step's last action token, per-token
   KL, observation tokens skipped rather than decayed through), for the ablation.
2. The final IsSolved reward enters the return with weight 1; the original weighted step k's
   score by (N - k - 1), which gives the final reward weight 0.
3. Advantages are whitened over the batch's units (steps), each step counted once.
4. A loss or gradient that is NaN/inf skips that update and is counted; it never reaches the weights.
5. The loss of an optimizer step is one token mean over all its mini-batches. trl 0.11 (and the
   original) take a token mean per mini-batch and average those over the gradient-accumulation
   steps, so with mini-batches grouped by length a token of a short episode weighs more.
6. Gradients are clipped to a norm of 1.0 (--max-grad-norm; 0 turns it off); trl's default is none.
7. No `ratio_threshold`: trl 0.11 zeroes the loss of a mini-batch whose mean ratio exceeds 10 (a
   guard against loss spikes); here the clipped surrogate and gradient clipping are the only guards.
8. Forward passes without dropout, as the original (trl's forward runs in eval mode; LoRA dropout 0).
"""
import time
from dataclasses import dataclass

import torch

from harness import dist
import rollout


@dataclass
class PPOConfig:
    lr: float = 1e-5               # Adam learning rate (paper config)
    batch_size: int = 8            # episodes per PPO update
    mini_batch_size: int = 2       # episodes per forward/backward pass
    grad_accum: int = 4            # mini-batches per optimizer step
    ppo_epochs: int = 4            # passes over the batch per update
    init_kl_coef: float = 0.3      # beta_0
    adaptive_kl: bool = True       # Ziegler et al.'s controller; False keeps beta fixed
    target_kl: float = 6.0         # KL target of the controller (nats per episode)
    horizon: int = 10000           # controller horizon
    gamma: float = 0.99            # discount over steps
    lam: float = 0.95              # GAE lambda
    cliprange: float = 0.2         # epsilon of the clipped surrogate
    cliprange_value: float = 0.2   # epsilon_v of the clipped value loss
    vf_coef: float = 0.1           # weight of the value loss
    ent_coef: float = 0.0          # entropy bonus (0 = off, as the paper)
    max_grad_norm: float = 1.0     # gradient clipping
    whiten: bool = True            # normalize advantages over the batch
    advantage: str = "step"        # "step" (StepTool) or "token" (the original code's variant)


class KLController:
    """beta of the KL penalty; adaptive as Ziegler et al. (2019), or fixed."""

    def __init__(self, cfg):
        self.beta, self.cfg = cfg.init_kl_coef, cfg

    def update(self, kl, n):
        if self.cfg.adaptive_kl:
            err = max(-0.2, min(0.2, kl / self.cfg.target_kl - 1))
            self.beta *= 1 + err * n / self.cfg.horizon


# ---- units: where values are read and advantages live ---------------------------------------
def units(ep, mode):
    """-> (action positions [N], value positions [U], unit of each action token [N], last action token of each step [S]).

    step:  one unit per step; V(s_t) at the state's last token; all tokens of a_t share unit t.
    token: one unit per action token (the original's per-token GAE); V at the token before it.
    Computed once per episode and cached on it.
    """
    key = "_units_" + mode
    if key not in ep.__dict__:
        pos = torch.tensor(ep.act).nonzero().squeeze(-1)                      # [N] action token positions
        step = torch.tensor(ep.step)[pos]                                     # [N] their step index
        N = len(pos)
        last = torch.zeros(ep.n_steps, dtype=torch.long).scatter_reduce(0, step, torch.arange(N), "amax")  # [S]
        if mode == "step":
            ep.__dict__[key] = (pos, torch.tensor(ep.state_end), step, last)
        else:
            ep.__dict__[key] = (pos, pos - 1, torch.arange(N), last)
    return ep.__dict__[key]


def collate(eps, mode, device):
    """Right-pad a list of episodes into one forward batch, with flat index tensors.

    ids, mask [B, T]; act_idx ([N], [N]) (row, position) and act_tok [N]; v_idx ([U], [U]);
    unit [N]: index of each action token's unit in the flat [U] order of the batch.
    """
    T = max(len(e.ids) for e in eps)
    ids = torch.zeros(len(eps), T, dtype=torch.long)
    mask = torch.zeros(len(eps), T, dtype=torch.long)
    ab, at, vb, vt, unit, u0 = [], [], [], [], [], 0
    for b, e in enumerate(eps):
        ids[b, :len(e.ids)] = torch.tensor(e.ids)
        mask[b, :len(e.ids)] = 1
        pos, vpos, unit_of, _ = units(e, mode)
        ab.append(torch.full_like(pos, b)); at.append(pos)
        vb.append(torch.full_like(vpos, b)); vt.append(vpos)
        unit.append(unit_of + u0); u0 += len(vpos)
    d = lambda xs: torch.cat(xs).to(device)
    act_idx, ids, mask = (d(ab), d(at)), ids.to(device), mask.to(device)
    return dict(ids=ids, mask=mask, act_idx=act_idx, act_tok=ids[act_idx], v_idx=(d(vb), d(vt)), unit=d(unit))


def _chunks(eps, size):
    """Mini-batches of similar length (less padding): sort by length, then cut."""
    order = sorted(range(len(eps)), key=lambda i: len(eps[i].ids))
    return [[eps[i] for i in order[k:k + size]] for k in range(0, len(order), size)]


# a 2-token episode (one context, one action token) that a rank runs, with weight 0, when it has fewer
# mini-batches than another: under FSDP2 every forward is a collective (dist.py)
STANDIN = rollout.Episode([0, 0], [False, True], [-1, 0], [0], [0.0])
STANDIN.old_logp = STANDIN.old_values = STANDIN.A = STANDIN.R = torch.zeros(1)


@torch.no_grad()
def prepare(policy, eps, cfg, ranks=dist.ONE):
    """Old log-probs, reference log-probs and old values of each episode (no gradient)."""
    was = policy.training
    policy.eval()
    chunks = _chunks(eps, cfg.mini_batch_size)
    for k in range(ranks.max(len(chunks)) if ranks.lockstep else len(chunks)):
        mb = chunks[k] if k < len(chunks) else None                      # None: a stand-in (lockstep only)
        c = collate(mb or [STANDIN], cfg.advantage, policy.device)
        logp, V, _ = policy(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
        with policy.reference():
            ref_logp, _, _ = policy(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
        if mb is None:
            continue
        n = [len(units(e, cfg.advantage)[0]) for e in mb]
        u = [len(units(e, cfg.advantage)[1]) for e in mb]
        for e, lp, rl, v in zip(mb, logp.split(n), ref_logp.split(n), V.split(u)):
            e.old_logp, e.ref_logp, e.old_values = lp.cpu(), rl.cpu(), v.cpu()
    policy.train(was)


def gae(r, V, mask, gamma, lam):
    """Generalized advantage estimation over units, as an explicit reversed loop (Sec. 4.2).

    r, V, mask: [B, U], units padded at the end (mask 0). V after the last unit is 0.
    -> A, R: [B, U]
    """
    B, U = r.shape
    A = torch.zeros_like(r)
    last = torch.zeros(B)
    for t in reversed(range(U)):
        nxt = mask[:, t + 1] if t + 1 < U else torch.zeros(B)         # 1 if s_{t+1} exists
        V_next = V[:, t + 1] * nxt if t + 1 < U else torch.zeros(B)
        delta = r[:, t] + gamma * V_next - V[:, t]                      # TD error over steps, Sec. 4.2
        last = delta + gamma * lam * nxt * last                         # GAE recursion over steps, Sec. 4.2
        A[:, t] = last * mask[:, t]
    return A, (A + V) * mask


def advantages(eps, beta, cfg, ranks=dist.ONE):
    """Step rewards - KL penalty -> GAE -> whitened advantages; stored on each episode. On several
    ranks GAE runs per episode here and the whitening mean and std are over every rank's units."""
    r_list, V_list, kls = [], [], []
    for e in eps:
        kl_tok = e.old_logp - e.ref_logp                                    # [N] k1 estimate of KL per token
        kls.append(kl_tok.sum().item())
        _, vpos, unit_of, last_tok = units(e, cfg.advantage)
        r = torch.zeros(len(vpos))
        r.index_add_(0, unit_of, -beta * kl_tok)                            # KL penalty, summed over each unit's tokens
        step_r = torch.tensor(e.rewards, dtype=torch.float)                # [S]
        if cfg.advantage == "step":
            r += step_r                                                     # r_t on step t
        else:
            r[last_tok] += step_r                             # r_t on the last action token of step t
        r_list.append(r); V_list.append(e.old_values)
    U = max((len(r) for r in r_list), default=1)                      # (a rank may hold no episode)
    pad = lambda xs: torch.stack([torch.cat([x, x.new_zeros(U - len(x))]) for x in xs]) if xs else torch.zeros(0, U)  # [B, U]
    mask = pad([torch.ones(len(r)) for r in r_list])
    A, R = gae(pad(r_list), pad(V_list), mask, cfg.gamma, cfg.lam)
    if cfg.whiten:
        a = A[mask.bool()]
        if ranks.world == 1:
            A = (A - a.mean()) / (a.std(unbiased=False) + 1e-8) * mask
        else:                                                           # departure 3, over every rank's units
            mean, std = ranks.mean_std(a)
            A = (A - mean) / (std + 1e-8) * mask
    for b, e in enumerate(eps):
        n = len(r_list[b])
        e.A, e.R = A[b, :n], R[b, :n]
    step_r = torch.cat([torch.tensor(e.rewards, dtype=torch.float) for e in eps] or [torch.zeros(0)])
    return {"reward/step_mean": ranks.mean(step_r), "ppo/kl": ranks.mean(kls), "ppo/returns": ranks.mean(R[mask.bool()])}


def policy_loss(logp, old_logp, A, eps):
    """Clipped surrogate (Sec. 4.2) of each action token: logp, old_logp, A [N] -> (loss [N], rho [N])."""
    ratio = (logp - old_logp).exp()                                    # rho = pi_theta / pi_old
    return torch.max(-A * ratio, -A * ratio.clamp(1 - eps, 1 + eps)), ratio


def value_loss(V, old_V, R, eps_v):
    """Clipped value loss of each unit: V, old_V, R [U] -> 0.5 * max((V-R)^2, (V_clip-R)^2) [U]."""
    V_clip = old_V + (V - old_V).clamp(-eps_v, eps_v)                  # V may move at most eps_v from V_old
    return 0.5 * torch.max((V - R) ** 2, (V_clip - R) ** 2)


def update(policy, optimizer, eps, cfg, kl_ctl, gen=None, ranks=dist.ONE):
    """One PPO update on a batch of episodes that carry `rewards`. Returns logged statistics.

    Each optimizer step takes one group of episodes (mini_batch_size x grad_accum of them, cut into
    mini-batches of similar length). Its loss is one mean over the whole group: the policy loss (and
    the entropy) over all its action tokens, each token weighing the same whatever mini-batch it
    fell in; the value loss over all its units. Logged losses are the same means over the update.
    On several ranks `eps` are this rank's episodes of the batch; the groups are drawn over the
    global batch (every rank's episodes in rank order: the batch's order) from the same `gen`, each
    rank computes the group's episodes it holds, and the counts N, U are the group's (dist.py)."""
    eps = [e for e in eps if e.n_steps > 0]
    # (action tokens, units, tokens) of every rank's episodes; the global episode j is held by where[j]
    sizes = ranks.gather([(len(units(e, cfg.advantage)[0]), len(units(e, cfg.advantage)[1]), len(e.ids)) for e in eps])
    where = [(r, i) for r, s in enumerate(sizes) for i in range(len(s))]                 # j -> (rank, local index)
    size = [x for s in sizes for x in s]                                                 # j -> (N_j, U_j, T_j)
    if not where:  # e.g. every prompt too long for max_context: nothing to learn from
        return {"ppo/kl_coef": kl_ctl.beta, "ppo/skipped_updates": 0, "ppo/episodes": 0, "ppo/tokens": 0}
    t0 = time.perf_counter()
    prepare(policy, eps, cfg, ranks)
    t_prepare = time.perf_counter() - t0
    stats = advantages(eps, kl_ctl.beta, cfg, ranks)
    params = [p for p in policy.parameters() if p.requires_grad]
    model = ranks.module(policy)                                      # the DDP wrapper, or the policy itself
    agg, skipped, n_tok, n_unit = {}, 0, 0, 0
    policy.train_without_dropout()  # no dropout: pi_theta = pi_old exactly until the first step
    group = cfg.mini_batch_size * cfg.grad_accum
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(len(where), generator=gen).tolist()
        for g in range(0, len(where), group):                          # one optimizer step per group
            grp = perm[g:g + group]
            N = sum(size[j][0] for j in grp)                               # action tokens of the step (every rank's)
            U = sum(size[j][1] for j in grp)                               # units (steps) of the step
            chunks = _chunks([eps[where[j][1]] for j in grp if where[j][0] == ranks.rank], cfg.mini_batch_size)
            held = [sum(where[j][0] == r for j in grp) for r in range(ranks.world)]
            M = max(-(-h // cfg.mini_batch_size) for h in held)           # the most mini-batches a rank has
            optimizer.zero_grad(set_to_none=True)
            ok, sums = True, {}
            for k in range(M):
                mb = chunks[k] if k < len(chunks) else None                 # None: a stand-in of weight 0 (dist.py)
                run = mb or [STANDIN]
                with ranks.sync(last=k == M - 1):
                    c = collate(run, cfg.advantage, policy.device)
                    dev = policy.device
                    old_logp = torch.cat([e.old_logp for e in run]).to(dev)        # [N_mb]
                    old_V = torch.cat([e.old_values for e in run]).to(dev)         # [U_mb]
                    A_unit = torch.cat([e.A for e in run]).to(dev)                 # [U_mb]
                    R = torch.cat([e.R for e in run]).to(dev)                      # [U_mb]
                    A = A_unit[c["unit"]]                                          # [N_mb] step advantage -> each of its tokens
                    logp, V, ent = model(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"], entropy=cfg.ent_coef > 0)
                    pg, ratio = policy_loss(logp, old_logp, A, cfg.cliprange)       # clipped surrogate, Sec. 4.2
                    pg, vf = pg.sum(), value_loss(V, old_V, R, cfg.cliprange_value).sum()
                    en = ent.sum() if ent is not None else torch.zeros((), device=dev)
                    loss = (pg - cfg.ent_coef * en) / N + cfg.vf_coef * vf / U       # this mini-batch's share of the step's means
                    if ranks.world > 1:       # DDP / FSDP2 average gradients over ranks: world x their average is their sum
                        loss = loss * (ranks.world if mb is not None else 0.0)
                    if not torch.isfinite(loss):
                        ok = False
                        if ranks.world == 1:
                            break
                    loss.backward()           # on several ranks even a non-finite one: the collectives must match
                if mb is None or not ok:
                    continue
                with torch.no_grad():  # summed as tensors: no device sync per mini-batch
                    for key, v in {"loss/policy": pg, "loss/value": vf, "loss/entropy": en, "ppo/ratio": ratio.sum(),
                                   "ppo/clipfrac": ((ratio - 1).abs() > cfg.cliprange).float().sum(),
                                   "ppo/approx_kl": 0.5 * ((logp - old_logp) ** 2).sum()}.items():
                        sums[key] = sums.get(key, 0.0) + v
            ok = ranks.all_true(ok)                                        # a NaN on any rank skips the step on all
            norm = dist.full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))) if ok else torch.tensor(float("nan"))
            if not ok or not torch.isfinite(norm):
                optimizer.zero_grad(set_to_none=True)                          # a NaN never reaches the weights
                skipped += 1
                continue
            optimizer.step()
            n_tok, n_unit = n_tok + N, n_unit + U
            for key in LOGGED if ranks.world > 1 else sums:                    # every rank the same keys
                agg[key] = agg.get(key, 0.0) + sums.get(key, 0.0)
    kl_ctl.update(stats["ppo/kl"], len(where))
    if ranks.world > 1 and agg:
        agg = dict(zip(agg, ranks.sum([float(v) for v in agg.values()])))
    stats.update({k: float(v) / max(n_unit if k == "loss/value" else n_tok, 1) for k, v in agg.items()})
    stats.update({"ppo/kl_coef": kl_ctl.beta, "ppo/skipped_updates": skipped, "ppo/episodes": len(where),
                  "ppo/tokens": sum(s[2] for s in size), "time/prepare_s": t_prepare,
                  "time/epochs_s": time.perf_counter() - t0 - t_prepare})
    return stats


LOGGED = ("loss/policy", "loss/value", "loss/entropy", "ppo/ratio", "ppo/clipfrac", "ppo/approx_kl")


def make_optimizer(policy, cfg):
    """The one place that builds the optimizer: after dist.Ranks.wrap, whose FSDP2 (full fine-tuning on
    several ranks) replaces the parameters by sharded ones, which AdamW then steps shard by shard."""
    return torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)


# ---- fixed trajectories (the original StepTool TSV) -----------------------------------------
def episodes_from_rows(policy, rows, max_tokens=None):
    """TSV rows {prompt, response, reward} (reward.read_tsv) -> Episodes with step rewards.

    prompt[0] is the state before the first action; prompt[k] is the observation after action k-1.
    With max_tokens, each trajectory keeps its last max_tokens tokens; a step whose action (or the
    state token before it) is cut is dropped with its reward, and counted in the second return value.
    """
    eps, dropped = [], 0
    for row in rows:
        ep = rollout.Episode()
        for k, (p, r) in enumerate(zip(row["prompt"], row["response"])):
            ep.add_context(policy.tok(p, add_special_tokens=False)["input_ids"])
            ep.add_action(policy.tok(r, add_special_tokens=False)["input_ids"])
        ep.rewards = list(row["reward"])
        if max_tokens and len(ep.ids) > max_tokens:
            ep, d = truncate_left(ep, max_tokens)
            dropped += d
        eps.append(ep)
    return eps, dropped


def truncate_left(ep, n):
    """Keep the last n tokens. A step survives only with its whole action and the last token of its
    state (where V(s_t) is read); the others lose their gradient and reward."""
    cut = len(ep.ids) - n
    keep = [t for t in range(ep.n_steps) if ep.state_end[t] >= cut]
    new = rollout.Episode(ids=ep.ids[cut:], act=[], step=[], state_end=[], rewards=[ep.rewards[t] for t in keep])
    remap = {t: i for i, t in enumerate(keep)}
    for p in range(cut, len(ep.ids)):
        s = ep.step[p] if ep.act[p] and ep.step[p] in remap else -1
        new.act.append(s >= 0); new.step.append(remap.get(s, -1) if s >= 0 else -1)
    new.state_end = [ep.state_end[t] - cut for t in keep]
    return new, ep.n_steps - len(keep)


if __name__ == "__main__":  # the benchmarks are bench.py's; `python ppo.py --bench ...` is the same command
    import sys

    from harness import bench
    bench.main([a for a in sys.argv[1:] if a != "--bench"])
