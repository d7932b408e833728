"""The paper's comparison and ablation in miniature (Sec. 5, Tables 2 and 4), on the embedded benchmark.

    python -m harness.compare [--seeds 0 1 2] [--output results/]
    python -m harness.compare --model smollm2 --seeds 0 --output results/smollm2     # a real LM (README)

For each seed, one SFT warm start (steptool.py without PPO iterations), evaluated once, then each
method from that same checkpoint, with the same budget: the same number of sampled episodes and of
updates. `--sft-adapters A A A` gives three seeds one shared start, evaluated once (seed0/sft). The schedule is steptool.py's for --model (harness.launch.defaults: by what the model is).
    sft                 the warm start itself
    rft                 SFT on the policy's own Solved rollouts (steptool.py --algo rft)
    ppo                 PPO (final reward): the paper's baseline, IsSolved on the last token and the original
                        code's per-token GAE (--reward final --advantage token)
    steptool            step-grained rewards and step-grained optimization (the defaults)
    ppo_final           StepTool w/o step-grained reward shaping: the final reward, GAE over steps
                        (--reward final; its folder name is older than its name)
    steptool_token_adv  StepTool w/o step-grained optimization: step rewards, per-token GAE (--advantage token);
                        per-token GAE keeps the original's gamma 0.99 and lambda 0.95 per token, so it tests the
                        original's granularity, horizon included, not the granularity alone
Outputs: OUTPUT/table.md (Pass Rate and Recall per group, mean ± std over seeds), OUTPUT/summary.json
({method: {group: {pass_rate_mean, pass_rate_std, recall_mean, recall_std, seeds}}, "benchmark": the task files'
benchmark and version (formats.benchmark), "per_seed": {method: {seed: {group: pass rate}}}, "ci": {"a-b": {group:
[lo, hi]}}, "ci_seeds_tasks": the same}: 95 % CIs of pass-rate differences, paired bootstrap over the test tasks
(paired_bootstrap), and with each method's seeds resampled too (hierarchical_bootstrap); "effects", when the
four RL methods of the 2x2 ran: its two main effects and interaction (EFFECTS), each an estimate and both CIs),
OUTPUT/curves.png
(test Pass Rate against sampled episodes), and each run in OUTPUT/seed<S>/<method>/ (steptool.py's
metrics.jsonl, checkpoint, final model). Resumable: a finished (method, seed) run is not redone, an
unfinished one continues from its last checkpoint. OUTPUT must be new, empty, or a compare.py folder
of ours (its marker, runs.py; the committed results/ has one); a foreign folder is refused.

Any other flag goes to every run, e.g. --iterations 10 --eval-limit 20 for a shorter comparison.
"""
import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import eval as evaluation
from harness import launch
from harness import runs
import steptool

METHODS = {"rft": ["--algo", "rft", "--reward", "final"],
           "ppo": ["--reward", "final", "--advantage", "token"],
           "ppo_final": ["--reward", "final", "--advantage", "step"],
           "steptool": ["--reward", "stepgrained", "--advantage", "step"],
           "steptool_token_adv": ["--reward", "stepgrained", "--advantage", "token"]}
NAMES = {"sft": "SFT", "rft": "RFT", "ppo": "PPO (final reward)", "steptool": "StepTool",
         "ppo_final": "StepTool w/o step-grained reward shaping (final reward, step GAE)",
         "steptool_token_adv": "StepTool w/o step-grained optimization (step rewards, token GAE)"}
GROUPS = ("G1", "G2", "G3", "overall")
# the schedule every run of a comparison shares, spelled out on its command line
SCHEDULE = ("sft_epochs", "sft_lr", "sft_episodes", "iterations", "episodes_per_iteration", "eval_every", "eval_limit",
            "save_every", "lr", "mini_batch_size", "grad_accum", "ppo_epochs", "init_kl_coef", "max_steps",
            "max_new_tokens", "full_finetune")
# the paper's claims: StepTool over SFT, PPO (final reward) and RFT (Table 2) and over its two ablations (Table 4)
CI_PAIRS = (("steptool", "sft"), ("steptool", "ppo"), ("ppo", "sft"), ("steptool", "rft"),
            ("steptool", "ppo_final"), ("steptool", "steptool_token_adv"))


def paired_bootstrap(a, b, n=10000, seed=0, level=0.95):
    """Paired bootstrap CI of Pass Rate(a) - Pass Rate(b), in points: a, b = {(group, query id): pass}
    over the same tasks. Tasks are resampled with replacement within each group (the groups keep their
    sizes); "overall" is the mean of the group rates, as the Avg column. -> {group: [lo, hi], "overall": ...}"""
    if set(a) != set(b):
        raise ValueError(f"paired bootstrap: the two runs were evaluated on different tasks ({len(set(a) ^ set(b))} differ)")
    rng = np.random.default_rng(seed)
    groups = sorted({g for g, _ in a})
    means = {}
    for g in groups:
        d = np.array([a[k] - b[k] for k in sorted(a) if k[0] == g]) * 100
        means[g] = evaluation.resampled_means(d, n, rng)             # [n] resampled mean differences
    means["overall"] = np.mean([means[g] for g in groups], axis=0)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {g: [float(x) for x in np.percentile(m, q)] for g, m in means.items()}


def hierarchical_bootstrap(a_runs, b_runs, n=10000, seed=0, level=0.95):
    """CI of Pass Rate(a) - Pass Rate(b), in points, with training variance in it: a_runs, b_runs = one
    {(group, query id): pass} per seed, on the same tasks. Each draw resamples each method's seeds with
    replacement (its seeds' mean pass per task), independently per method (unpaired: seed s of a shares only
    its task order with seed s of b; a method against itself gets an interval around 0, not [0, 0]), then the
    tasks within each group, the same tasks for both (paired). Each run's per-task noise is drawn in both
    stages, so the interval leans wide where seeds vary little. One seed each: the task-only paired bootstrap.
    -> {group: [lo, hi], "overall": ...}"""
    return contrast_bootstrap([a_runs, b_runs], [1, -1], n, seed, level)


def contrast_bootstrap(method_runs, weights, n=10000, seed=0, level=0.95):
    """CI of sum_m weights[m] * Pass Rate(m), in points, resampling seeds then tasks as hierarchical_bootstrap
    does: method_runs = for each method, one {(group, query id): pass} per seed, all on the same tasks."""
    keys = sorted(method_runs[0][0])
    if any(set(r) != set(keys) for runs_ in method_runs for r in runs_):
        raise ValueError("hierarchical bootstrap: the runs were evaluated on different tasks")
    rng = np.random.default_rng(seed)
    d = 0
    for runs_, w in zip(method_runs, weights):
        x = np.array([[r[k] for k in keys] for r in runs_], dtype=float)                 # [seeds, T]
        d = d + w * x[rng.integers(len(x), size=(n, len(x)))].mean(1) * 100           # [n, T] seeds resampled
    means = {}
    for g in sorted({g for g, _ in keys}):
        idx = np.array([i for i, k in enumerate(keys) if k[0] == g])
        pick = idx[rng.integers(len(idx), size=(n, len(idx)))]                 # [n, tasks of g]
        means[g] = np.take_along_axis(d, pick, 1).mean(1)
    means["overall"] = np.mean([means[g] for g in means], axis=0)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {g: [float(x) for x in np.percentile(m, q)] for g, m in means.items()}


# the 2x2 of the paper's two components: (step rewards?, step GAE?) of each RL method
FACTORS = {"steptool": (1, 1), "steptool_token_adv": (1, 0), "ppo_final": (0, 1), "ppo": (0, 0)}
EFFECTS = {  # contrasts over the four cells, in points: main effects average the other factor's two levels
    "step-grained reward shaping (main effect)": {"steptool": .5, "ppo_final": -.5, "steptool_token_adv": .5, "ppo": -.5},
    "step-grained optimization (main effect)": {"steptool": .5, "steptool_token_adv": -.5, "ppo_final": .5, "ppo": -.5},
    "interaction (shaping's effect with step GAE minus with token GAE)":
        {"steptool": 1, "ppo_final": -1, "steptool_token_adv": -1, "ppo": 1}}


def effects(summary, per_task):
    """The 2x2's two main effects and interaction: estimate (from the seed means) and both CIs, per group."""
    out = {}
    for name, w in EFFECTS.items():
        est = {g: sum(c * summary[m][g]["pass_rate_mean"] for m, c in w.items()) for g in GROUPS}
        out[name] = {"estimate": est,
                     "ci": contrast_bootstrap([[mean_over_seeds(per_task[m])] for m in w], list(w.values())),
                     "ci_seeds_tasks": contrast_bootstrap([per_task[m] for m in w], list(w.values()))}
    return out


def std(xs):  # the sample standard deviation over seeds (0 for one seed)
    xs = list(xs)
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_tasks(run):
    """{(group, query id): pass} of the run's last evaluation (steptool.py's eval_tasks.json)."""
    with open(os.path.join(run, "eval_tasks.json")) as f:
        return {(t["group"], t["query_id"]): t["pass"] for t in json.load(f)["tasks"]}


def read_benchmark(run):
    """The benchmark and version the run's last evaluation used (eval_tasks.json; runs before versions were recorded
    say nothing: the embedded benchmark's v1)."""
    with open(os.path.join(run, "eval_tasks.json")) as f:
        return json.load(f).get("benchmark", "embedded v1 (not recorded)")


def mean_over_seeds(runs_):
    if any(set(r) != set(runs_[0]) for r in runs_):   # e.g. an LLM judge's errors leave a task out of one run
        raise ValueError("the seeds' runs of a method were evaluated on different tasks: "
                         f"{sorted(len(r) for r in runs_)} tasks (eval_tasks.json)")
    return {k: statistics.fmean(r[k] for r in runs_) for k in runs_[0]}


def finished(run, argv):
    """Whether the steptool.py run in `run` wrote its last file: final_model, or adapter.safetensors (a LoRA run's,
    what committed results keep), or, for a run of --iterations 0 (an SFT start: its weights are the start's own
    file), the start's evaluation in metrics.jsonl and eval_tasks.json."""
    if os.path.isdir(os.path.join(run, "final_model")) or os.path.isfile(os.path.join(run, "adapter.safetensors")):
        return True
    if launch.given_flags(argv).get("iterations") != 0 or not os.path.isfile(os.path.join(run, "eval_tasks.json")):
        return False
    return any(r.get("iteration") == 0 and "eval/overall/pass_rate" in r for r in read_metrics(run))


def run_once(run, argv, threads=()):
    """One steptool.py run in `run`: skipped when finished, resumed when a checkpoint exists, started
    again (--overwrite: only what it wrote) when a run of ours was killed before its first checkpoint.
    threads: ["--threads", N] or nothing, given to a resumed run too."""
    if finished(run, argv):
        return read_metrics(run)
    try:
        runs.find_checkpoint(run)
    except FileNotFoundError:
        again = ["--overwrite"] if os.path.isfile(os.path.join(run, runs.MARKER)) else []
        return steptool.main(argv + [*threads] + again + ["--output", run])
    return steptool.main(["--resume", run, *threads])


def table(summary, methods):
    lines = []
    for metric, title in (("pass_rate", "Pass Rate (%)"), ("recall", "Recall (%)")):
        lines += [f"**{title}**, mean ± sample std over seeds", "",
                  "| method | " + " | ".join(g if g != "overall" else "Avg" for g in GROUPS) + " |",
                  "|---|" + "---:|" * len(GROUPS)]
        for m in methods:
            cells = [f"{summary[m][g][metric + '_mean']:.1f} ± {summary[m][g][metric + '_std']:.1f}" for g in GROUPS]
            lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(next(iter(summary.get("per_seed", {None: {}}).values()))) > 1:   # several seeds: each one's row
        lines += ["**Pass Rate (%) of each seed**", "", "| method | seed | " + " | ".join(
            g if g != "overall" else "Avg" for g in GROUPS) + " |", "|---|---:|" + "---:|" * len(GROUPS)]
        for m in methods:
            for s, rates in summary["per_seed"][m].items():
                lines.append(f"| {NAMES[m]} | {s} | " + " | ".join(f"{rates[g]:.1f}" for g in GROUPS) + " |")
        lines.append("")
    return "\n".join(lines)


def ci_table(summary):
    lines, one_seed = [], all(len(s) == 1 for s in summary.get("per_seed", {}).values())
    for key, how in (("ci", "paired bootstrap 95 % CI over test tasks"),
                     ("ci_seeds_tasks", "hierarchical bootstrap 95 % CI over seeds and test tasks")):
        if not summary.get(key) or (one_seed and key == "ci_seeds_tasks"):   # one seed: the same as the task-only CI
            continue
        lines += ["", f"**Pass Rate differences** (points), {how}", "",
                  "| difference | " + " | ".join(g if g != "overall" else "Avg" for g in GROUPS) + " |",
                  "|---|" + "---:|" * len(GROUPS)]
        for pair, ci in summary[key].items():
            a, b = pair.split("-")
            diff = {g: summary[a][g]["pass_rate_mean"] - summary[b][g]["pass_rate_mean"] for g in GROUPS}
            lines.append(f"| {NAMES[a]} − {NAMES[b]} | " + " | ".join(
                f"{diff[g]:+.1f} [{ci[g][0]:+.1f}, {ci[g][1]:+.1f}]" for g in GROUPS) + " |")
    for name, e in summary.get("effects", {}).items():
        if name.startswith("step-grained reward"):
            again = " (one seed: the task-only CI again)" if one_seed else ""
            lines += ["", "**The 2×2 of the paper's components** (points of Pass Rate): estimate, task-only CI, "
                      "seeds-and-tasks CI" + again, "", "| effect | " + " | ".join(g if g != "overall" else "Avg" for g in GROUPS)
                      + " |", "|---|" + "---:|" * len(GROUPS)]
        lines.append(f"| {name} | " + " | ".join(
            f"{e['estimate'][g]:+.1f} [{e['ci'][g][0]:+.1f}, {e['ci'][g][1]:+.1f}] "
            f"[{e['ci_seeds_tasks'][g][0]:+.1f}, {e['ci_seeds_tasks'][g][1]:+.1f}]" for g in GROUPS) + " |")
    return "\n".join(lines + [""]) if lines else ""


def plot(curves, path):
    plt = launch.pyplot("compare")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4))
    span = sorted({x for pts in curves.values() for x in pts})
    for m, pts in curves.items():   # pts: {episodes: [pass rate of each seed]}
        xs = sorted(pts)
        mean = [statistics.fmean(pts[x]) for x in xs]
        sd = [std(pts[x]) for x in xs]
        if len(xs) == 1:            # SFT: no training episodes, a level across the plot
            xs, mean, sd = [span[0], span[-1]], mean * 2, sd * 2
        ax.plot(xs, mean, marker="o" if m != "sft" else None, linestyle="--" if m == "sft" else "-", label=NAMES[m])
        ax.fill_between(xs, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)], alpha=0.15)
    ax.set_xlabel("sampled training episodes"); ax.set_ylabel("test Pass Rate (%)")
    ax.legend(fontsize=8); fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--output", default="results")
    ap.add_argument("--methods", nargs="+", default=["sft", *METHODS], choices=["sft", *METHODS])
    ap.add_argument("--model", default="tiny", help="the base of every SFT start (steptool.py --model)")
    ap.add_argument("--sft-adapters", nargs="+", default=[], metavar="FILE",
                    help="an SFT start for each seed, in --seeds order, instead of training one: an adapter file "
                         "(steptool.py's sft_adapter.safetensors), evaluated in the seed's SFT run")
    ap.add_argument("--parallel", type=int, default=1, help="independent runs at once, as processes (one GPU holds "
                    "many small runs; on CPU each gets cores / N threads unless --threads says otherwise)")
    argv = sys.argv[1:] if argv is None else argv
    args, extra = ap.parse_known_args(argv)
    if len(args.sft_adapters) > len(args.seeds) or not all(map(os.path.isfile, args.sft_adapters)):
        runs.fail("compare", f"--sft-adapters {' '.join(args.sft_adapters)}: one existing file per seed at most "
                             f"(seeds {' '.join(map(str, args.seeds))})")
    # the model's schedule, spelled out on every run's command line: each method starts from the SFT run's
    # checkpoint or adapter file (--sft-epochs 0) and keeps the SFT run's schedule, whatever that start is
    cfg = steptool.Config(**launch.defaults(args.model))      # the paper's values, the model's preset over them
    sched = {k: getattr(cfg, k) for k in SCHEDULE}
    base = [f"--{k.replace('_', '-')}={v}" for k, v in sched.items() if k != "full_finetune"]
    base += ["--full-finetune" if sched["full_finetune"] else "--no-full-finetune"]
    # OUTPUT is a compare folder of ours (or new): resumable by design, so no --overwrite; each
    # (seed, method) run below is a steptool.py run with a claim of its own
    try:
        run = runs.claim(args.output, "compare", resume=True,
                         entries=["table.md", "summary.json", "curves.png", *(f"seed{s}" for s in args.seeds)])
    except runs.RunError as e:
        runs.fail("compare", e)
    with run:
        return compare(args, base, extra, argv)


def shared_threads(jobs, parallel, cores=None):
    """The --threads of every run (resumed ones too): the one given, else cores / processes for processes
    sharing the CPU, else nothing (one process: torch's default)."""
    argv = jobs[0][1] if jobs else []
    given = [a for i, a in enumerate(argv) if a.startswith("--threads=") or (i and argv[i - 1] == "--threads")]
    if given:
        return ("--threads", given[-1].split("=")[-1])
    n = min(parallel, len(jobs))
    return ("--threads", str(max(1, (cores or os.cpu_count() or 1) // n))) if n > 1 else ()


def run_all(jobs, parallel):
    """[(run, argv)] -> [metrics], each by run_once: here one after another, or in `parallel` processes
    (spawned: each with its own tool server, model and lock on its run folder). Unless --threads is given,
    the processes share the CPU cores: cores / processes threads each (2 runs x 1 thread did 1.4x the
    work of 1 run x 2 threads here: SmolLM2's batch-16 decode and prefill, 2 cores)."""
    n, threads = min(parallel, len(jobs)), shared_threads(jobs, parallel)
    if n <= 1:
        return [run_once(*j, threads) for j in jobs]
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_once, *zip(*jobs), [threads] * len(jobs)))   # a run that fails (SystemExit too) fails compare


def compare(args, base, extra, argv):
    """Every (seed, method) run in the claimed args.output, then the table, summary and curves."""
    t0 = time.time()
    roots = {seed: os.path.join(args.output, f"seed{seed}") for seed in args.seeds}
    given = dict(zip(args.seeds, map(os.path.abspath, args.sft_adapters)))   # SFT starts trained before
    # a start given to several seeds as one file (the RL seeds' shared SFT start) is evaluated once, in the SFT
    # run of the first of them
    sft_of = {s: next((r for r in args.seeds[:k] if s in given and given.get(r) == given[s]), s)
              for k, s in enumerate(args.seeds)}
    starts = [s for s in args.seeds if sft_of[s] == s]
    # first every SFT start (trained, or given and evaluated), then every method from its seed's start
    warm = dict(zip(starts, run_all([(os.path.join(roots[s], "sft"), base + extra + [
        "--model", args.model, "--seed", str(s), "--iterations", "0"]
        + (["--adapters", given[s], "--sft-epochs", "0"] if s in given else [])) for s in starts], args.parallel)))
    warm = {s: warm[sft_of[s]] for s in args.seeds}
    print(f"compare: SFT starts done, {(time.time() - t0) / 60:.1f} min so far")
    jobs = []
    for seed in args.seeds:
        # every method starts from the SFT run's policy, evaluated once, there: LoRA from its adapter file
        # (a few MB, committed with the results), full fine-tuning from its checkpoint
        adapter = given.get(seed) or os.path.join(roots[seed], "sft", "sft_adapter.safetensors")
        start = ["--model", args.model, "--adapters", adapter] if os.path.isfile(adapter) else \
                ["--model", os.path.join(roots[seed], "sft", "checkpoint")]
        jobs += [((seed, m), (os.path.join(roots[seed], m), base + extra + [
            "--seed", str(seed), *start, "--sft-epochs", "0", "--no-eval-start"] + METHODS[m]))
            for m in args.methods if m != "sft"]
    done = dict(zip([k for k, _ in jobs], run_all([j for _, j in jobs], args.parallel)))
    final, curves, per_task = {m: [] for m in args.methods}, {m: {} for m in args.methods}, {m: [] for m in args.methods}
    for seed in args.seeds:
        for m in args.methods:
            ms = warm[seed] if m == "sft" else warm[seed][:1] + done[seed, m]
            final[m].append(ms[-1])
            for rec in ms:
                if rec.get("eval/overall/pass_rate") is not None:
                    curves[m].setdefault(rec.get("episodes", 0), []).append(rec["eval/overall/pass_rate"])
            per_task[m].append(read_tasks(os.path.join(roots[sft_of[seed] if m == "sft" else seed], m)))
    summary = {m: {g: {"pass_rate_mean": statistics.fmean(r[f"eval/{g}/pass_rate"] for r in final[m]),
                       "pass_rate_std": std(r[f"eval/{g}/pass_rate"] for r in final[m]),
                       "recall_mean": statistics.fmean(r[f"eval/{g}/recall"] for r in final[m]),
                       "recall_std": std(r[f"eval/{g}/recall"] for r in final[m]),
                       "seeds": list(args.seeds)} for g in GROUPS} for m in args.methods}
    # paired over test tasks (both models on the same tasks), each task's pass averaged over the seeds
    summary["ci"] = {f"{a}-{b}": paired_bootstrap(mean_over_seeds(per_task[a]), mean_over_seeds(per_task[b]))
                     for a, b in CI_PAIRS if a in per_task and b in per_task}
    # the same differences with training variance in them: each method's seeds resampled, then the tasks
    summary["ci_seeds_tasks"] = {f"{a}-{b}": hierarchical_bootstrap(per_task[a], per_task[b])
                                 for a, b in CI_PAIRS if a in per_task and b in per_task}
    summary["per_seed"] = {m: {str(s): {g: r[f"eval/{g}/pass_rate"] for g in GROUPS} for s, r in zip(args.seeds, final[m])}
                           for m in args.methods}
    if set(FACTORS) <= set(per_task):   # the whole 2x2 ran: its main effects and interaction
        summary["effects"] = effects(summary, per_task)
    summary["benchmark"] = ", ".join(sorted({read_benchmark(os.path.join(roots[sft_of[s] if m == "sft" else s], m))
                                             for s in args.seeds for m in args.methods}))
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = table(summary, args.methods) + ci_table(summary)
    with open(os.path.join(args.output, "table.md"), "w") as f:
        f.write(f"Seeds {args.seeds}; benchmark {summary['benchmark']}, evaluation tasks of the runs' --eval-tasks "
                f"(default: the test split); `python -m harness.compare {' '.join(argv)}`\n\n" + text)
    plot(curves, os.path.join(args.output, "curves.png"))
    print(text)
    print(f"compare: {args.output}/table.md and summary.json in {(time.time() - t0) / 60:.1f} min")
    return summary


if __name__ == "__main__":
    runs.interruptible("compare", main, "finished runs are kept; the same command continues the others")
