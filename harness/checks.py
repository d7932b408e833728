"""Bad input is refused before any work: steptool.py's flags and input files, checked before the tool
server starts, the run folder is claimed or a model loads. Each error is one line naming the flag or the
file (and its item); the command exits with status 2 and no traceback. Every file is read by formats.py's
one reader (a regular file, at most 1 GiB, JSON nested at most 200 levels, no key twice) and every item
checked there and in formats.load_tasks (field types, plain group names, integer query ids, none twice).

    check_flags(cfg)       ranges and choices of every numeric or named flag
    check_inputs(cfg, ..)  the task files, the offline TSV and the reward function, read once
"""
import os
from dataclasses import field

from harness import formats
from harness import models
import reward


class InputError(ValueError):
    """A flag or input file that would make a run fail late or train nothing."""


def opt(default, help, ok=None, need=""):
    """A harness command's option (harness/annotate.py, harness/evaluate.py): its default, its --help text,
    and the range its value must lie in (ok, in words: need). steptool.Config has its own two-line opt."""
    return field(default=default, metadata={"help": help, "ok": ok, "need": need})


def rule(lo=None, hi=None, lo_open=False, hi_open=False):
    """v must be finite and within [lo, hi] (open ends where said) -> (test, words)."""
    def ok(v):
        return formats.finite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    words = " and ".join(w for w in ((f"{'>' if lo_open else '>='} {lo}" if lo is not None else ""),
                                     (f"{'<' if hi_open else '<='} {hi}" if hi is not None else "")) if w)
    return ok, f"a finite number {words}".strip()


NONNEG, POSITIVE, ONE_UP = rule(0), rule(0, lo_open=True), rule(1)
RULES = {  # flag: (test, what it must be)
    "iterations": NONNEG, "episodes_per_iteration": ONE_UP, "ppo_epochs": ONE_UP, "mini_batch_size": ONE_UP,
    "grad_accum": ONE_UP, "save_every": ONE_UP, "eval_every": NONNEG, "eval_limit": NONNEG,
    "sft_epochs": NONNEG, "sft_episodes": NONNEG, "sft_micro_batch_size": ONE_UP, "sft_lr": POSITIVE, "lr": POSITIVE,
    "init_kl_coef": NONNEG, "target_kl": POSITIVE, "horizon": POSITIVE, "gamma": rule(0, 1), "lam": rule(0, 1),
    "cliprange": POSITIVE, "cliprange_value": POSITIVE, "vf_coef": NONNEG, "ent_coef": NONNEG, "max_grad_norm": NONNEG,
    "alpha": NONNEG, "temperature": NONNEG, "top_p": rule(0, 1, lo_open=True), "max_steps": ONE_UP,
    "max_new_tokens": ONE_UP, "max_context": ONE_UP, "obs_chars": ONE_UP, "lora_r": ONE_UP, "lora_alpha": POSITIVE,
    "lora_dropout": rule(0, 1, hi_open=True), "threads": NONNEG,
}
CHOICES = {"algo": ("ppo", "rft"), "advantage": ("step", "token"), "dtype": ("auto", "float32", "bfloat16")}


def flag(name):
    return "--" + name.replace("_", "-")


def check_ranges(cfg, rules=None):
    """Each flag of `rules` (default RULES) that cfg has, within its range."""
    for name, (ok, what) in (rules or RULES).items():
        v = getattr(cfg, name, None)
        if v is not None and not ok(v):
            raise InputError(f"{flag(name)} {v}: must be {what}")


def check_model(model, adapters=()):
    """A path-like --model must exist (never a Hub id probed); each adapter file must exist."""
    if models.looks_like_path(model) and models.unreadable(os.path.expanduser(model)):   # a symlink loop: said so
        raise InputError(f"--model {model}: {models.unreadable(os.path.expanduser(model))} (a path, not a Hub id)")
    for a in adapters:
        if not os.path.isfile(a):
            raise InputError(f"--adapters {a}: no such file")


def check_choice(cfg, name):
    """A flag of CHOICES (of steptool.py or eval.py) is one of its values."""
    if getattr(cfg, name) not in CHOICES[name]:
        raise InputError(f"{flag(name)} {getattr(cfg, name)}: use one of {', '.join(CHOICES[name])}")


def check_flags(cfg, resumed=False):
    """resumed: the model is the checkpoint's (its base holds --model and --adapters merged), so not checked."""
    check_ranges(cfg)
    for name in CHOICES:
        check_choice(cfg, name)
    if cfg.max_context <= cfg.max_new_tokens:
        raise InputError(f"--max-context {cfg.max_context}: must exceed --max-new-tokens {cfg.max_new_tokens} "
                         "(a turn must fit after the prompt)")
    if not resumed:
        check_model(cfg.model, cfg.adapters)


def check_inputs(cfg, train_files, eval_files, given=()):
    """Read every input once -> (train tasks, eval tasks, offline rows or None); InputError if any is
    unreadable, empty, or cannot train what the flags ask. given: the flags named on the command line
    (an --sft-epochs given for tasks without expert trajectories is refused; the schedule's is skipped)."""
    def tasks_of(files, what):
        tasks, seen = [], {}
        for p in files:
            for t in formats.load_tasks(p):   # read whole and checked (formats.read_json); TaskFileError names file, item
                if what == "--eval-tasks" and seen.setdefault((t.group, t.query_id), p) != p:
                    # evaluation scores by (group, query id): one of the two would silently replace the other
                    raise InputError(f"{what}: query_id {t.query_id} of group {t.group} is in both "
                                     f"{seen[t.group, t.query_id]} and {p}")
                tasks.append(t)
        if not tasks:
            raise InputError(f"{what} {' '.join(files)}: no tasks")
        return tasks
    try:
        reward._mode(cfg.reward)                                 # module.function is importable and callable
    except ValueError as e:
        raise InputError(f"--reward: {e}") from None
    try:
        train = tasks_of(train_files, "--tasks")
        evals = tasks_of(eval_files, "--eval-tasks")
        rows = formats.read_tsv(cfg.data) if cfg.data else None   # non-empty, finite rewards; names file and line
    except (ValueError, OSError) as e:       # formats.TaskFileError, formats.py's file errors: they name file and line
        raise InputError(str(e)) from None
    if not cfg.judge_url:   # IsSolved of a task without answer facts needs a judge; never a constant 0.5
        for what, files, tasks in (("--tasks", train_files, [] if cfg.data else train), ("--eval-tasks", eval_files, evals)):
            if any(not (t.answer or t.world) for t in tasks):
                raise InputError(f"{what} {' '.join(files)}: {sum(not (t.answer or t.world) for t in tasks)} tasks have no answer facts "
                                 "to judge IsSolved by: give --judge-url")
    if "sft_epochs" in given and cfg.sft_epochs and not cfg.data and not any(t.expert for t in train):
        raise InputError(f"--sft-epochs {cfg.sft_epochs}: no task of {' '.join(train_files)} has an expert trajectory "
                         "to warm up on; give --sft-epochs 0 (or tasks with experts)")
    return train, evals, rows
