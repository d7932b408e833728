"""steptool.train on torchrun's ranks: the same loop, each rank its block of every batch (dist.py).

cleanrl-style, the single-process loop (steptool.train) has no rank in it; this is its copy for N
ranks, kept equal to it by tests/test_dist.py (2 ranks end with one process's metrics). What differs,
line for line: the policy is wrapped (DDP or FSDP2) before the optimizer is built; rank k rolls out
episodes B*k//N .. B*(k+1)//N - 1 of each batch (FSDP2: with pi_theta's weights whole for sampling);
the rollout and reward means are reduced over ranks; the update is Ranks.update and the evaluation
Ranks.evaluate (dist.py). launch.py calls this instead of steptool.train when torchrun started N > 1.
"""
import time

import torch

import ppo
import reward
import rollout
import steptool


def train(cfg, policy, client, judge, eval_judge, tasks, eval_tasks, offline, run):
    ranks = run.ranks
    pcfg = steptool.ppo_config(cfg)
    kl_ctl = ppo.KLController(pcfg)
    if not cfg.resume or run.in_warm_start:
        if cfg.sft_epochs and offline is None:          # whole on every rank (dist.py, departure 3)
            steptool.warm_start(policy, tasks, client, cfg, run)
        policy.freeze_reference()
    optimizer = ppo.make_optimizer(ranks.wrap(policy), pcfg)   # after the wrapping: FSDP2 shards the parameters
    start = run.restore(policy, optimizer, kl_ctl)
    if start == 0 and cfg.eval_start and not run.metrics:
        with run.iteration(0, policy, optimizer, kl_ctl) as rec:
            rec.update(evaluate(policy, eval_tasks, client, cfg, eval_judge, ranks))

    B = cfg.episodes_per_iteration
    lo, hi = ranks.block(B)                               # this rank's episodes of each batch
    for it in range(start + 1, cfg.iterations + 1):
        with run.iteration(it, policy, optimizer, kl_ctl) as rec:
            torch.manual_seed(cfg.seed * 100003 + it)
            gen = torch.Generator().manual_seed(cfg.seed * 100003 + it)
            if offline is not None:
                idx = torch.randperm(len(offline), generator=gen)[:B].tolist()[lo:hi]
                eps = [rollout.Episode(offline[i].ids, offline[i].act, offline[i].step, offline[i].state_end,
                                       offline[i].rewards) for i in idx]
            else:
                batch = [tasks[i] for i in torch.randint(len(tasks), (B,), generator=gen).tolist()][lo:hi]
                with ranks.sampling(policy):
                    eps, trajs = rollout.rollout(policy, batch, client, seed=cfg.seed, iteration=it, first_episode=lo,
                                                 max_steps=cfg.max_steps, max_new_tokens=cfg.max_new_tokens,
                                                 max_context=cfg.max_context, temperature=cfg.temperature,
                                                 top_p=cfg.top_p, obs_chars=cfg.obs_chars)
                rewards, rstats = reward.shape_batch(batch, trajs, cfg.reward, cfg.alpha, judge, obs_chars=cfg.obs_chars)
                for e, r in zip(eps, rewards):
                    e.rewards = r
                rec.update(rollout_stats(eps, trajs, rstats, policy, run))
            stats = ranks.update(policy, optimizer, eps, pcfg, kl_ctl, gen)   # --algo rft: refused on N ranks
            rec.update({k: float(v) for k, v in stats.items()})
            if (cfg.eval_every and it % cfg.eval_every == 0) or it == cfg.iterations:
                rec.update(evaluate(policy, eval_tasks, client, cfg, eval_judge, ranks))
            rec.update({"iteration": it, "episodes": it * B})


def evaluate(policy, tasks, client, cfg, judge, ranks):
    """steptool.evaluate sharded: Ranks.evaluate's numbers as steptool.evaluate's record on rank 0 ({} elsewhere)."""
    t0 = time.time()
    scored, groups, each, trajs = ranks.evaluate(policy, tasks, client, cfg, judge)
    return {**steptool.eval_record(scored, groups, each, t0), "eval/trajectories": trajs} if ranks.main else {}


def rollout_stats(eps, trajs, rstats, policy, run):
    """steptool.rollout_stats over every rank's episodes: sums, and each of reward.py's means weighted by
    what it is a mean over (episodes, or intermediate calls)."""
    ranks, g0, g1 = run.ranks, run.gen_stats, policy.gen_stats
    n = ranks.sum([len(eps), g1["prefill_tokens"] - g0["prefill_tokens"], sum(sum(e.act) for e in eps),
                   sum(e.n_steps for e in eps), sum(len(e.ids) for e in eps), sum(t.finish == "give_answer" for t in trajs),
                   rstats["judge_fallbacks"]])
    calls = sum(len(reward.intermediate(t)) for t in trajs)
    solved, succ, contrib = ranks.weighted([(rstats["is_solved"], len(trajs)), (rstats["succ_calling"], calls),
                                            (rstats["contribution"], calls)])
    return {"time/rollout_s": time.time() - run.t0, "time/prefill_s": g1["prefill_s"] - g0["prefill_s"],
            "time/decode_s": g1["decode_s"] - g0["decode_s"],
            "rollout/prefill_tokens": float(n[1]), "rollout/sampled_tokens": float(n[2]),
            "rollout/steps": float(n[3] / n[0]), "rollout/tokens": float(n[4] / n[0]), "rollout/finished": float(n[5] / n[0]),
            "reward/is_solved": float(solved), "reward/succ_calling": float(succ), "reward/contribution": float(contrib),
            "reward/judge_errors": float(n[6])}
