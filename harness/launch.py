"""Starting and ending a steptool.py run: everything around steptool.train that a reading of the method skips.

steptool.main calls `main` here once. In order: the flags (the preset by what --model is, --quick,
the flags given), torchrun's ranks (dist.py), the flags and input files checked (checks.py) before
anything loads, the run folder claimed and locked (runs.py) or --resume's checkpoint read, then
`start`: seeding, the embedded tool server, the judges, the model (models.load_policy), the memory
plan (memory.py), and steptool.train with a `Run`: the loop's view of the run folder (its metrics,
checkpoints and the SFT adapter file) and of the ranks. Afterwards the final table, the merged model,
the adapter file and curves.png; every failure ends in one line naming what to do next.
"""
import argparse
import contextlib
import gzip
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, fields

import numpy as np
import torch
from tqdm import tqdm

import env
import reward
import steptool
from harness import cache, checks, dist, dist_train, formats, memory, models, offline as O, runs, server, toolclient
from harness import judge as J

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_SAVE_S = 600   # a warm start in progress is checkpointed every 10 minutes (WarmStart)
# --resume may change these: where the tools are, the hardware, how often to save or evaluate, and
# the last iteration (to extend a run); any other flag would make a different run
RESUME_MAY_CHANGE = ("tool_server", "device", "threads", "save_every", "eval_every", "iterations")
# the top-level names a run writes in --output (runs.py: registered in its marker before writing)
ENTRIES = ("metrics.jsonl", "curves.png", *runs.written_whole("checkpoint", "base", "final_model"),
           *runs.written_whole("eval_tasks.json", "eval_trajectories.jsonl.gz", "sft_adapter.safetensors", "adapter.safetensors"))


# ---- flags: Config's default < the model's preset < --quick < the flag given ------------------
def build_parser():
    """Config's fields as flags, every default suppressed: a parse holds only the flags given, which
    win over the preset and --quick (config). --help shows each default and its presets."""
    ap = argparse.ArgumentParser(prog="steptool.py", description=steptool.__doc__.split("\n")[0])
    for f in fields(steptool.Config):
        kw = ({"action": argparse.BooleanOptionalAction} if f.type is bool else
              {"nargs": "+"} if f.type is tuple else {"type": f.type})
        others = [f"{name} {p[f.name]}" for name, p in (*steptool.PRESETS.items(), ("--quick", steptool.QUICK)) if f.name in p]
        shown = "" if f.default in (None, "", ()) else f"default: {f.default}"
        text = f.metadata["help"] + (f" ({'; '.join(x for x in [shown, *others] if x)})" if shown or others else "")
        ap.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, help=text, **kw)
    return ap


def given_flags(argv):
    """{field: value} of the flags named on the command line (build_parser suppresses every default)."""
    return vars(build_parser().parse_args(argv))


def parse_args(argv=None):
    return config(given_flags(argv))


def config(given):
    preset = defaults(given.get("model", steptool.Config.model))
    return steptool.Config(**{**preset, **(steptool.QUICK if given.get("quick") else {}), **given})


def defaults(model):
    """What --model's preset changes from the paper's values, by what the model is (model_kind). Our
    checkpoint gets its base's preset without a second SFT warm start: the run that wrote it had its own."""
    name = str(model)
    meta = cache.json_of(os.path.join(name, "policy.json"))
    if not isinstance(meta.get("base"), str):
        return steptool.PRESETS.get(model_kind(name), {})
    base, _ = models.checkpoint_base(name, meta)   # our checkpoint: its base, found as load_policy finds it
    return dict(steptool.PRESETS.get(model_kind(base), {}), sft_epochs=0)


def model_kind(name):
    """'tiny' (or a saved model of models.TINY's sizes, such as a tiny run's base/), an alias of models.py
    (`smollm2`, its converted folder or a copy), or None for any other model. Small JSON files only: no
    weights, no network, and a Hub id or a missing path is just another model (checks.py reports the latter)."""
    config = cache.json_of(os.path.join(str(name), "config.json"))
    sizes = ("hidden_size", "num_hidden_layers", "intermediate_size")
    if name == "tiny" or (config.get("model_type") == "qwen2" and all(config.get(k) == models.TINY[k] for k in sizes)):
        return "tiny"
    return models.alias_of(name)


def resume_config(run_dir, given, state):
    """--resume DIR: the checkpoint's config, writing to DIR wherever the run was first written (a moved
    or copied run continues in place), with the flags that do not change the run taken from the
    command line. Any other flag that differs from the checkpoint's is refused, naming it."""
    Config = steptool.Config
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


def limit_per_group(tasks, n):
    if not n:
        return tasks
    seen = {}
    return [t for t in tasks if seen.setdefault(t.group, []).append(t) or len(seen[t.group]) <= n]


# ---- the run folder as the loop sees it ---------------------------------------------------------
def write_trajectories(path, it, each, trajs):
    """An evaluation's episodes, one JSON line each, gzipped (no time stamp: the same episodes, the same bytes):
    the task's group, id and pass, each step's call (name, arguments, parse error, SuccCalling by the rules, the
    first 300 characters of its observation), how it ended and its answer."""
    passed = {(e["group"], str(e["query_id"])): e["pass"] for e in each}   # label files key ids as text
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for t in trajs:
            steps = [{"name": s.name, "arguments": s.arguments, "error": s.error, "succ": reward.succ_calling(s),
                      "observation": s.observation[:300]} for s in t.steps]
            f.write((json.dumps({"iteration": it, "group": t.group, "query_id": t.query_id,
                                 "pass": passed.get((t.group, str(t.query_id))), "steps": steps, "finish": t.finish,
                                 "final_answer": t.final_answer, "end": t.end}) + "\n").encode())


class Run:
    """steptool.train's run: where it starts (`start`, `metrics`), what it logs and saves, and the ranks.
    Rank 0 alone writes; under FSDP2 every rank takes part in gathering full tensors first."""

    def __init__(self, cfg, ranks, ckpt=None, state=None):
        self.cfg, self.ranks, self.ckpt, self.state = cfg, ranks, ckpt, state
        self.start, self.metrics = 0, []
        self.metrics_path = os.path.join(cfg.output, "metrics.jsonl")

    def say(self, line):
        if self.ranks.main:
            print(line)

    def progress(self, items, desc):
        return tqdm(items, desc=desc, leave=False, disable=not self.ranks.main)

    def restore(self, policy, optimizer, kl_ctl):
        """--resume: Adam's state, beta, the iteration, the metrics and the RNG of the checkpoint, and
        metrics.jsonl cut back to its lines. A new run (or one resumed in its warm start): an empty metrics.jsonl
        and checkpoint 0 (after SFT: a killed first evaluation never redoes it). -> the iteration it continues after."""
        if self.state is None or self.in_warm_start:
            if self.ranks.main:
                open(self.metrics_path, "w").close()
            self.save(0, policy, optimizer, kl_ctl)
            return 0
        else:
            self.ranks.load_optimizer_state(optimizer, self.state["optimizer"])
            kl_ctl.beta, self.start, self.metrics = self.state["kl_beta"], self.state["iteration"], self.state["metrics"]
            runs.set_rng_state(self.state["rng"])
            if self.ranks.main:
                with open(self.metrics_path, "w") as f:           # drop lines written after the checkpoint
                    f.writelines(json.dumps(m) + "\n" for m in self.metrics)
                print(f"steptool: resumed {self.ckpt} at iteration {self.start}")
        return self.start

    @property
    def in_warm_start(self):
        """Resumed from a checkpoint taken during the SFT warm start (WarmStart): SFT goes on from it."""
        return self.state is not None and "sft_step" in self.state

    def warm_start_checkpoint(self, policy):
        return WarmStart(self, policy)

    def sft_done(self, policy):
        if policy.lora_cfg and self.ranks.main:               # the SFT start as a small file of its own
            runs.write_file(os.path.join(self.cfg.output, "sft_adapter.safetensors"),
                            lambda f: models.save_adapter(policy, f), binary=True)

    @contextlib.contextmanager
    def iteration(self, it, policy, optimizer, kl_ctl):
        """An iteration's record: filled by the loop, then timed, kept, appended to metrics.jsonl and
        printed (its eval/tasks, an evaluation's per-task scores, to eval_tasks.json instead); then a
        checkpoint every --save-every iterations, at the last and at 0 (the start's evaluation)."""
        self.t0, self.gen_stats, rec = time.time(), dict(policy.gen_stats), {}
        yield rec
        rec.setdefault("iteration", it)
        rec["time/iteration_s"] = time.time() - self.t0
        each, trajs = rec.pop("eval/tasks", None), rec.pop("eval/trajectories", None)
        self.metrics.append(rec)
        if self.ranks.main:
            if trajs is not None:   # what each task's episode did, for the failure analysis (harness.analysis)
                runs.write_file(os.path.join(self.cfg.output, "eval_trajectories.jsonl.gz"),
                                lambda tmp: write_trajectories(tmp, it, each, trajs), binary=True)
            if each is not None:
                bench = ", ".join(sorted({formats.benchmark(p) for p in input_files(self.cfg)[1]}))
                runs.write_file(os.path.join(self.cfg.output, "eval_tasks.json"),
                                lambda f: json.dump({"iteration": it, "benchmark": bench, "tasks": each}, f))
            log_line(self.metrics_path, rec)
        if it == 0 or it % self.cfg.save_every == 0 or it == self.cfg.iterations:
            self.save(it, policy, optimizer, kl_ctl)

    def save(self, iteration, policy, optimizer, kl_ctl):
        """A checkpoint (runs.py writes it whole): the weights, Adam, beta, the config, the metrics, the RNG."""
        weights, opt = self.ranks.full_state(policy), self.ranks.optimizer_state(optimizer)
        if self.ranks.main:
            models.save_checkpoint(self.cfg.output, policy, {
                "optimizer": opt, "kl_beta": kl_ctl.beta, "iteration": iteration,
                "config": asdict(self.cfg), "metrics": self.metrics, "rng": runs.rng_state()}, weights=weights)


class WarmStart:
    """sft.sft's `checkpoint` in a run's SFT warm start: every SFT_SAVE_S seconds a checkpoint of the steps taken
    (the adapter, AdamW, the schedule, the RNG: state["sft_step"]), so a run killed in a warm start of hours
    loses minutes. --resume from it takes the remaining steps with the same numbers as a run never stopped."""

    def __init__(self, run, policy):
        self.run, self.policy, self.t = run, policy, time.time()

    def load(self, opt, sched):
        """-> the steps taken before the checkpoint resumed from (AdamW, the schedule and the RNG as they were), or 0."""
        if not self.run.in_warm_start:
            return 0
        state = self.run.state
        opt.load_state_dict(state["sft_optimizer"])
        sched.load_state_dict(state["sft_schedule"])
        runs.set_rng_state(state["rng"])
        self.run.say(f"sft: resumed {self.run.ckpt} after step {state['sft_step']}")
        return state["sft_step"]

    def step(self, k, opt, sched):
        if time.time() - self.t < SFT_SAVE_S:
            return
        if self.run.ranks.main:   # every rank holds the same whole SFT policy (dist.py, departure 3)
            models.save_checkpoint(self.run.cfg.output, self.policy, {
                "sft_step": k, "sft_optimizer": opt.state_dict(), "sft_schedule": sched.state_dict(), "iteration": 0,
                "config": asdict(self.run.cfg), "metrics": [], "rng": runs.rng_state()})
        self.t = time.time()


def log_line(metrics_path, rec):
    with open(metrics_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    keys = [k for k in rec if k.startswith(("rollout/", "reward/", "loss/", "ppo/kl", "eval/")) and "/G" not in k]
    print(f"iter {rec['iteration']:4d} | " + " | ".join(f"{k} {rec[k]:.3f}" for k in keys if isinstance(rec[k], float))
          + f" | {rec['time/iteration_s']:.1f}s")


# ---- the run ------------------------------------------------------------------------------------
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
        main_thread = threading.current_thread() is threading.main_thread()
        term = signal.signal(signal.SIGTERM, _interrupt) if ranks.world == 1 and main_thread else None
        try:
            metrics = start(cfg, inputs, ckpt, state, ranks, given)
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


def resume_hint(out):
    """What will work after a run in `out` stopped: --resume if it saved a checkpoint, else a new start."""
    try:
        return f"the last checkpoint, {runs.find_checkpoint(out)}, is intact: continue with --resume {out}"
    except FileNotFoundError:
        return f"it saved no checkpoint: start again, with --overwrite to reuse {out}"


def start(cfg, inputs, ckpt=None, state=None, ranks=dist.ONE, given=()):
    """The run in cfg.output (claimed by main): inputs (train tasks, eval tasks, offline TSV rows or None)
    read and checked by checks.check_inputs; ckpt and state: the checkpoint resumed from, if any."""
    train_tasks, eval_tasks, offline_rows = inputs
    eval_tasks = limit_per_group(eval_tasks, cfg.eval_limit)
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
        client = toolclient.ToolClient(url)
        client.check()                                   # a dead server fails here, before any training
        judge = J.Judge(cfg.judge_url, cfg.judge_model, repeats=1) if cfg.judge_url else None
        eval_judge = J.labeller(J.FactsJudge(cfg.judge_url, cfg.judge_model))   # answers -> label entries
        if cfg.resume:   # the dtype it was trained in
            policy = models.load_policy(ckpt, device=device)
        else:
            dtype, why = ranks.gather(models.pick_dtype(cfg.dtype, models.default_device(device)))[0]   # rank 0's, on all
            if ranks.main:
                print(f"dtype: {str(dtype).removeprefix('torch.')} ({why})")
            policy = models.load_policy(cfg.model, device=device, dtype=dtype, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                        lora_dropout=cfg.lora_dropout, lora_targets=tuple(cfg.lora_targets),
                                        full_finetune=cfg.full_finetune, gradient_checkpointing=cfg.gradient_checkpointing,
                                        seed=cfg.seed, adapters=tuple(cfg.adapters))
            # gradient checkpointing and micro-batches from the measured memory plan, where no flag fixed them
            memory.plan(policy, cfg, given, log=print if ranks.main else lambda line: None)
        offline = None
        if cfg.data:
            offline, dropped = O.episodes_from_rows(policy, offline_rows, cfg.max_context)
            if ranks.main:
                print(f"offline: {len(offline)} trajectories from {cfg.data}" + (f", {dropped} cut steps" if dropped else ""))
        run = Run(cfg, ranks, ckpt, state)
        train = steptool.train if ranks.world == 1 else dist_train.train   # torchrun: the loop on N ranks
        train(cfg, policy, client, judge, eval_judge, train_tasks, eval_tasks, offline, run)
        metrics = run.metrics
    except toolclient.ToolServerError as e:
        if not os.path.isdir(os.path.join(cfg.output, "checkpoint")):
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
    finish(cfg, policy, metrics, ranks)
    return metrics


def finish(cfg, policy, metrics, ranks):
    """The final table (the SFT start against the end), the merged model, the adapter file, curves.png."""
    weights = ranks.full_state(policy)                    # FSDP2: every rank gathers, rank 0 writes
    if not ranks.main:
        return
    first, last = (metrics[0], metrics[-1]) if metrics else ({}, {})
    groups = sorted({k[len("eval/"):].rsplit("/", 1)[0] for m in (first, last) for k in m if k.startswith("eval/")})
    print(f"\n{'group':10s} {'pass rate: start':>18s} {'after PPO':>10s} {'recall: start':>14s} {'after PPO':>10s}")
    for g in groups:
        f = lambda m, k: m.get(f"eval/{g}/{k}") if m.get(f"eval/{g}/{k}") is not None else float("nan")
        print(f"{g:10s} {f(first, 'pass_rate'):18.1f} {f(last, 'pass_rate'):10.1f} {f(first, 'recall'):14.1f} {f(last, 'recall'):10.1f}")
    final = os.path.join(cfg.output, "final_model")
    runs.write_dir(final, lambda p: models.export_merged(policy, p, state=weights))  # final_model.tmp, renamed
    if policy.lora_cfg:                                   # LoRA + value head on pi_ref's base, a few MB
        runs.write_file(os.path.join(cfg.output, "adapter.safetensors"), lambda f: models.save_adapter(policy, f), binary=True)
    plot(metrics, os.path.join(cfg.output, "curves.png"))
    print(f"steptool: metrics {os.path.join(cfg.output, 'metrics.jsonl')}, merged model {final}")


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


def flags_table():
    """docs/flags.md: every flag of steptool.py with its --help text (default and presets), as markdown."""
    rows = ["# steptool.py's flags", "",
            "Generated from `python steptool.py --help` by `python -m harness.launch --flags-table > docs/flags.md`;",
            "a test fails when it drifts. Defaults are the paper's; a preset by what --model is (`tiny`,",
            "`smollm2`) and `--quick` change a few; a flag given on the command line always wins.", "",
            "| flag | meaning (default; presets) |", "|---|---|"]
    for a in build_parser()._actions:
        if a.option_strings and a.dest != "help":
            rows.append(f"| `{a.option_strings[0]}` | {a.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--flags-table"]:
        sys.exit("usage: python -m harness.launch --flags-table > docs/flags.md")
    sys.stdout.write(flags_table())
