"""What the policies learned: a failure taxonomy of each method's final evaluation, from its episodes.

    python -m harness.analysis --output results/smollm2 [--tasks data/bench_test.json]

Reads OUTPUT/seed<S>/<method>/eval_trajectories.jsonl.gz (steptool.py writes one per evaluation: each
test task's episode, its steps and its pass) and the task file (each task's expert calls, relevant
APIs and answer facts); writes OUTPUT/analysis.md (the taxonomy, steps and calls per episode, per
method, summed over seeds) and OUTPUT/failures.png. Every episode that does not pass (pass < 1) gets
the first of these that fits, checked in this order:

    finish never          no Finish with an answer: out of steps or context, or it gave up
    finish too early      a Finish with an answer but not one successful call before it
    relevant API skipped  an API the expert called with values from the query alone was never called
    dependent call skipped   every such API was called, but one that needs a value from an earlier
                          response (its expert arguments are not in the query) was never called
    wrong arguments / error  every relevant API was called, but some expert call was never made with its
                          arguments (compared as lower-case text) by a call that succeeded
    right calls, wrong answer   every expert call made and successful, the answer lacks a fact
"""
import argparse
import glob
import gzip
import json
import os
from collections import Counter

from harness import formats

KINDS = ("finish never", "finish too early", "relevant API skipped", "dependent call skipped",
         "wrong arguments / error", "right calls, wrong answer")


def norm(args):
    return json.dumps({str(k).lower(): str(v).strip().lower() for k, v in (args or {}).items()}, sort_keys=True)


def failure(task, ep):
    """The taxonomy's kind for an episode that did not pass (see the docstring), or "solved"."""
    if ep["pass"] is not None and ep["pass"] >= 1:
        return "solved"
    if ep["finish"] != "give_answer" or not ep["final_answer"].strip():
        return "finish never"
    calls = [s for s in ep["steps"] if s["name"] != "Finish"]
    if not any(s["succ"] for s in calls):
        return "finish too early"
    expert = task.expert[:-1]                                               # the last is Finish
    called = {s["name"] for s in calls}
    independent = lambda e: all(str(v).lower() in task.query.lower() for v in e["arguments"].values())
    missing = [e for e in expert if e["name"] not in called]
    if any(independent(e) for e in missing):
        return "relevant API skipped"
    if missing:
        return "dependent call skipped"
    made = {(s["name"], norm(s["arguments"])) for s in calls if s["succ"]}
    if any((e["name"], norm(e["arguments"])) not in made for e in expert):
        return "wrong arguments / error"
    return "right calls, wrong answer"


def read_episodes(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def taxonomy(output, tasks):
    """{method: {"kinds": Counter, "episodes": n, "steps": mean, "calls": mean, "failed_calls": mean, "seeds": [..]}}"""
    by_key = {(t.group, t.query_id): t for t in tasks}
    out = {}
    for path in sorted(glob.glob(os.path.join(output, "seed*", "*", "eval_trajectories.jsonl.gz"))):
        method, seed = os.path.basename(os.path.dirname(path)), os.path.basename(os.path.dirname(os.path.dirname(path)))
        m = out.setdefault(method, {"kinds": Counter(), "episodes": 0, "steps": 0, "calls": 0, "failed_calls": 0, "seeds": []})
        m["seeds"].append(seed)
        for ep in read_episodes(path):
            task = by_key.get((ep["group"], ep["query_id"]))
            if task is None:
                raise SystemExit(f"analysis: {path}: task {ep['group']}/{ep['query_id']} is not in --tasks")
            calls = [s for s in ep["steps"] if s["name"] != "Finish"]
            m["kinds"][failure(task, ep)] += 1
            m["episodes"] += 1
            m["steps"] += len(ep["steps"]); m["calls"] += len(calls); m["failed_calls"] += sum(not s["succ"] for s in calls)
    for m in out.values():
        for k in ("steps", "calls", "failed_calls"):
            m[k] /= max(m["episodes"], 1)
    return out


def report(tax, names):
    lines = ["| method | seeds | episodes | solved | " + " | ".join(KINDS) + " | steps | calls | failed calls |",
             "|---|---:|---:|---:|" + "---:|" * len(KINDS) + "---:|---:|---:|"]
    for method, m in tax.items():
        pct = lambda k: f"{100 * m['kinds'][k] / max(m['episodes'], 1):.1f}"
        lines.append(f"| {names.get(method, method)} | {len(m['seeds'])} | {m['episodes']} | {pct('solved')} | "
                     + " | ".join(pct(k) for k in KINDS) + f" | {m['steps']:.2f} | {m['calls']:.2f} | {m['failed_calls']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(tax, names, path):
    from harness import launch
    plt = launch.pyplot("analysis")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.5 * len(tax)))
    for i, (method, m) in enumerate(tax.items()):
        left = 0.0
        for k in KINDS:
            w = 100 * m["kinds"][k] / max(m["episodes"], 1)
            ax.barh(i, w, left=left, color=f"C{KINDS.index(k)}", label=k if i == 0 else None)
            left += w
    ax.set_yticks(range(len(tax)), [names.get(m, m) for m in tax], fontsize=7)
    ax.set_xlabel("% of test episodes that fail, by the first kind that fits")
    ax.legend(fontsize=7, loc="lower right"); fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)


def main(argv=None):
    from harness import compare
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", required=True, help="a harness.compare folder")
    ap.add_argument("--tasks", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                                    "bench_test.json"), help="the task file the runs were evaluated on")
    a = ap.parse_args(argv)
    tax = taxonomy(a.output, formats.load_tasks(a.tasks))
    if not tax:
        raise SystemExit(f"analysis: no seed*/*/eval_trajectories.jsonl.gz under {a.output}")
    text = ("# What the policies learned\n\nEach failed test episode of each method's final evaluation, by the first "
            "kind that fits (harness/analysis.py's docstring defines them), in % of episodes; steps, calls and failed "
            f"calls per episode. Benchmark: {formats.benchmark(a.tasks)}.\n\n" + report(tax, compare.NAMES))
    with open(os.path.join(a.output, "analysis.md"), "w") as f:
        f.write(text)
    plot(tax, compare.NAMES, os.path.join(a.output, "failures.png"))
    print(text)


if __name__ == "__main__":
    main()
