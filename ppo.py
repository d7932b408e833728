"""Step-grained PPO (paper Sec. 4.2), by hand.

Letters used in shape comments: B episodes, S steps (tool-call turns) of an episode, T tokens,
N action tokens (sampled by the policy), U advantage units (steps, or action tokens with
--advantage token), Vocab vocabulary.

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
No forward pass (prepare and update) runs dropout, as the original's (trl's eval mode, LoRA dropout 0): rho is 1
until the first optimizer step, bit for bit when an optimizer step takes the whole batch (the defaults), else up to rounding.

One process; benchmarks (update time, tokens/s, memory): `python -m harness.bench`. On several ranks
(torchrun) harness/dist.py's `Ranks.update` runs this update on each rank's share of the batch.

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
"""
import time
from dataclasses import dataclass

import torch


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
    Computed once per episode and cached on it."""
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
    unit [N]: index of each action token's unit in the flat [U] order of the batch."""
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


@torch.no_grad()
def prepare(policy, eps, cfg):
    """Old log-probs, reference log-probs and old values of each episode (no gradient)."""
    was = policy.training
    policy.eval()
    for mb in _chunks(eps, cfg.mini_batch_size):
        c = collate(mb, cfg.advantage, policy.device)
        logp, V, _ = policy(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
        with policy.reference():
            ref_logp, _, _ = policy(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
        n = [len(units(e, cfg.advantage)[0]) for e in mb]
        u = [len(units(e, cfg.advantage)[1]) for e in mb]
        for e, lp, rl, v in zip(mb, logp.split(n), ref_logp.split(n), V.split(u)):
            e.old_logp, e.ref_logp, e.old_values = lp.cpu(), rl.cpu(), v.cpu()
    policy.train(was)


def gae(r, V, mask, gamma, lam):
    """Generalized advantage estimation over units, an explicit reversed loop (Sec. 4.2): r, V, mask
    [B, U], units padded at the end (mask 0), V after the last unit 0 -> A, R [B, U]."""
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


def unit_rewards(e, beta, mode):
    """r_t - beta * KL of each unit of an episode -> (r [U], the episode's summed KL)."""
    kl_tok = e.old_logp - e.ref_logp                                    # [N] k1 estimate of KL per token
    _, vpos, unit_of, last_tok = units(e, mode)
    r = torch.zeros(len(vpos))
    r.index_add_(0, unit_of, -beta * kl_tok)                            # KL penalty (Sec. 4.2), summed per unit
    step_r = torch.tensor(e.rewards, dtype=torch.float)                # [S]
    if mode == "step":
        r += step_r                                                     # r_t on step t
    else:
        r[last_tok] += step_r                                           # r_t on the last action token of step t
    return r, kl_tok.sum().item()


def advantages(eps, beta, cfg):
    """Step rewards - KL penalty -> GAE -> whitened advantages; stored on each episode."""
    r_list, kls = zip(*[unit_rewards(e, beta, cfg.advantage) for e in eps])
    U = max(len(r) for r in r_list)
    pad = lambda xs: torch.stack([torch.cat([x, x.new_zeros(U - len(x))]) for x in xs])  # [B, U]
    mask = pad([torch.ones(len(r)) for r in r_list])
    A, R = gae(pad(r_list), pad([e.old_values for e in eps]), mask, cfg.gamma, cfg.lam)
    if cfg.whiten:                                                      # departure 3
        a = A[mask.bool()]
        A = (A - a.mean()) / (a.std(unbiased=False) + 1e-8) * mask
    for b, (e, r) in enumerate(zip(eps, r_list)):
        e.A, e.R = A[b, :len(r)], R[b, :len(r)]
    step_r = torch.cat([torch.tensor(e.rewards, dtype=torch.float) for e in eps])
    return {"reward/step_mean": step_r.mean().item(), "ppo/kl": sum(kls) / len(kls), "ppo/returns": R[mask.bool()].mean().item()}


def policy_loss(logp, old_logp, A, eps):
    """Clipped surrogate (Sec. 4.2) of each action token: logp, old_logp, A [N] -> (loss [N], rho [N])."""
    ratio = (logp - old_logp).exp()                                    # rho = pi_theta / pi_old
    return torch.max(-A * ratio, -A * ratio.clamp(1 - eps, 1 + eps)), ratio


def value_loss(V, old_V, R, eps_v):
    """Clipped value loss of each unit: V, old_V, R [U] -> 0.5 * max((V-R)^2, (V_clip-R)^2) [U]."""
    V_clip = old_V + (V - old_V).clamp(-eps_v, eps_v)                  # V may move at most eps_v from V_old
    return 0.5 * torch.max((V - R) ** 2, (V_clip - R) ** 2)


def update(policy, optimizer, eps, cfg, kl_ctl, gen=None):
    """One PPO update on a batch of episodes that carry `rewards`. Returns logged statistics.

    Each optimizer step takes one group of episodes (mini_batch_size x grad_accum of them, drawn by a
    permutation from `gen`, cut into mini-batches of similar length). Its loss is one mean over the group:
    the policy loss (and entropy) over all its action tokens, each weighing the same whatever mini-batch
    it fell in; the value loss over all its units. Logged losses are the same means over the update."""
    eps = [e for e in eps if e.n_steps > 0]
    if not eps:  # e.g. every prompt too long for max_context: nothing to learn from
        return {"ppo/kl_coef": kl_ctl.beta, "ppo/skipped_updates": 0, "ppo/episodes": 0, "ppo/tokens": 0}
    t0 = time.perf_counter()
    prepare(policy, eps, cfg)
    t_prepare = time.perf_counter() - t0
    stats = advantages(eps, kl_ctl.beta, cfg)
    params, dev = [p for p in policy.parameters() if p.requires_grad], policy.device
    agg, skipped, n_tok, n_unit = {}, 0, 0, 0
    policy.train_without_dropout()  # no dropout: pi_theta = pi_old exactly until the first step
    group = cfg.mini_batch_size * cfg.grad_accum
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(len(eps), generator=gen).tolist()
        for g in range(0, len(eps), group):                            # one optimizer step per group
            b_eps = [eps[j] for j in perm[g:g + group]]
            N = sum(len(units(e, cfg.advantage)[0]) for e in b_eps)        # action tokens of the step
            U = sum(len(units(e, cfg.advantage)[1]) for e in b_eps)        # units (steps) of the step
            optimizer.zero_grad(set_to_none=True)
            ok, sums = True, {}
            for mb in _chunks(b_eps, cfg.mini_batch_size):
                c = collate(mb, cfg.advantage, dev)
                mb_old_logp = torch.cat([e.old_logp for e in mb]).to(dev)     # [N_mb]
                mb_old_V = torch.cat([e.old_values for e in mb]).to(dev)      # [U_mb]
                mb_A_unit = torch.cat([e.A for e in mb]).to(dev)              # [U_mb]
                mb_R = torch.cat([e.R for e in mb]).to(dev)                   # [U_mb]
                mb_A = mb_A_unit[c["unit"]]                                   # [N_mb] step advantage -> each of its tokens
                logp, V, ent = policy(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"], entropy=cfg.ent_coef > 0)
                pg, ratio = policy_loss(logp, mb_old_logp, mb_A, cfg.cliprange)  # clipped surrogate, Sec. 4.2
                pg, vf = pg.sum(), value_loss(V, mb_old_V, mb_R, cfg.cliprange_value).sum()
                en = ent.sum() if ent is not None else torch.zeros((), device=dev)
                loss = (pg - cfg.ent_coef * en) / N + cfg.vf_coef * vf / U     # this mini-batch's share of the step's means
                ok = bool(torch.isfinite(loss))
                if not ok:                                                    # departure 4
                    break
                loss.backward()
                with torch.no_grad():  # summed as tensors: no device sync per mini-batch
                    for key, v in {"loss/policy": pg, "loss/value": vf, "loss/entropy": en, "ppo/ratio": ratio.sum(),
                                   "ppo/clipfrac": ((ratio - 1).abs() > cfg.cliprange).float().sum(),
                                   "ppo/approx_kl": 0.5 * ((logp - mb_old_logp) ** 2).sum()}.items():
                        sums[key] = sums.get(key, 0.0) + v
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")) if ok else torch.tensor(float("nan"))
            if not ok or not torch.isfinite(norm):
                optimizer.zero_grad(set_to_none=True)                          # a NaN never reaches the weights
                skipped += 1
                continue
            optimizer.step()
            n_tok, n_unit = n_tok + N, n_unit + U
            for key in sums:
                agg[key] = agg.get(key, 0.0) + sums[key]
    kl_ctl.update(stats["ppo/kl"], len(eps))
    stats.update({k: float(v) / max(n_unit if k == "loss/value" else n_tok, 1) for k, v in agg.items()})
    stats.update({"ppo/kl_coef": kl_ctl.beta, "ppo/skipped_updates": skipped, "ppo/episodes": len(eps),
                  "ppo/tokens": sum(len(e.ids) for e in eps), "time/prepare_s": t_prepare,
                  "time/epochs_s": time.perf_counter() - t0 - t_prepare})
    return stats


def make_optimizer(policy, cfg):
    """AdamW on the trainable weights; on several ranks built after harness.dist's Ranks.wrap (FSDP2 shards them)."""
    return torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
