"""pass@k of policies on a fixed subset of tasks: does RL discover new solutions or re-weight old ones?

    python -m harness.passk --model smollm2 --policy sft=results/smollm2/seed0/sft_adapter.safetensors \
        --policy steptool=results/smollm2/seed0/sft_adapter.safetensors,results/smollm2/seed0/steptool/adapter.safetensors \
        --per-group 10 --n 16 --output results/smollm2/passk

Each policy samples n episodes of each task (the first --per-group tasks of each group of --tasks) at
--temperature 1; IsSolved (the answer facts) decides each. pass@k for k = 1, 2, 4, ... n is the unbiased
estimate 1 - C(n - c, k) / C(n, k) of a task with c solved samples, averaged over the tasks (Chen et al.
2021). Against the first policy (the SFT start), a task of another policy is
    discovered     if it solves it (c > 0) and the first never does in its n samples (c = 0),
    re-weighted    if both solve it and it does more often.
Writes OUTPUT/<name>.json per policy (each task's c of n; a policy with a file is not sampled again, so a
killed run resumes at the next policy) and OUTPUT/passk.md.
"""
import argparse
import json
import math
import os

import eval as evaluation
import reward
from harness import formats, launch, models, server, toolclient


def pass_at_k(n, c, k):
    """The unbiased pass@k of a task with c of n samples solved."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def compare_counts(base, other):
    """{task: c} of the first policy and of another -> (discovered, re-weighted, lost): lists of tasks."""
    discovered = [t for t in base if base[t] == 0 < other[t]]
    reweighted = [t for t in base if 0 < base[t] < other[t]]
    lost = [t for t in base if other[t] == 0 < base[t]]
    return discovered, reweighted, lost


def sample(policy, tasks, n, client, a):
    """{task key: solved samples of n} for one policy (temperature a.temperature, episode i of its own rng)."""
    trajs = evaluation.run_policy(policy, tasks * n, client, temperature=a.temperature, max_steps=a.max_steps, seed=a.seed,
                                  max_new_tokens=a.max_new_tokens)
    counts = {f"{t.group}/{t.query_id}": 0 for t in tasks}
    for task, traj in zip(tasks * n, trajs):
        counts[f"{task.group}/{task.query_id}"] += reward.is_solved(task, traj) == 1.0
    return counts


def report(results, n):
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    lines = ["| policy | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for name, counts in results.items():
        cells = [100 * sum(pass_at_k(n, c, k) for c in counts.values()) / len(counts) for k in ks]
        lines.append(f"| {name} | " + " | ".join(f"{x:.1f}" for x in cells) + " |")
    names = list(results)
    for name in names[1:]:
        d, r, lost = compare_counts(results[names[0]], results[name])
        lines += ["", f"{name} against {names[0]} ({len(results[name])} tasks, {n} samples each): discovered {len(d)} "
                  f"(solved, never by {names[0]}), re-weighted {len(r)} (solved more often), lost {len(lost)} "
                  f"(never solved, solved by {names[0]})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the base (steptool.py --model)")
    ap.add_argument("--policy", action="append", required=True, metavar="NAME=ADAPTER[,ADAPTER...]",
                    help="a policy: a name and its adapter files on --model (none: the base); the first is the baseline")
    ap.add_argument("--tasks", default=os.path.join(launch.HERE, "data", "bench_test.json"))
    ap.add_argument("--per-group", type=int, default=10, help="tasks of each group: the first N")
    ap.add_argument("--n", type=int, default=16, help="samples of each task")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--output", required=True)
    a = ap.parse_args(argv)
    policies = []
    for p in a.policy:
        name, _, files = p.partition("=")
        adapters = [f for f in files.split(",") if f]
        if not name or not all(os.path.isfile(f) for f in adapters):
            raise SystemExit(f"passk: --policy {p}: give NAME=ADAPTER[,ADAPTER...] with existing files")
        policies.append((name, adapters))
    if a.n < 1 or a.per_group < 1:
        raise SystemExit("passk: --n and --per-group must be at least 1")
    tasks = launch.limit_per_group(formats.load_tasks(a.tasks), a.per_group)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    os.makedirs(a.output, exist_ok=True)
    srv, results = server.start_in_thread(), {}
    try:
        for name, adapters in policies:
            path = os.path.join(a.output, f"{name}.json")
            if not os.path.isfile(path):
                policy = models.for_sampling_only(models.load_policy(a.model, adapters=tuple(adapters)))
                counts = sample(policy, tasks, a.n, toolclient.ToolClient(srv.url), a)
                with open(path + ".tmp", "w") as f:
                    json.dump({"n": a.n, "temperature": a.temperature, "seed": a.seed, "adapters": adapters,
                               "benchmark": formats.benchmark(a.tasks), "counts": counts}, f, indent=1)
                os.replace(path + ".tmp", path)
            with open(path) as f:
                got = json.load(f)
            if got["n"] != a.n or set(got["counts"]) != {f"{t.group}/{t.query_id}" for t in tasks}:
                raise SystemExit(f"passk: {path} holds another --n or other tasks: give another --output")
            results[name] = got["counts"]
    finally:
        srv.shutdown()
    text = f"pass@k (%), {len(tasks)} tasks of {formats.benchmark(a.tasks)}, T = {a.temperature}\n\n" + report(results, a.n)
    with open(os.path.join(a.output, "passk.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
