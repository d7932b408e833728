"""Step rewards of recorded trajectories, and the training files of the original StepTool (reward.py's files).

    python -m harness.annotate annotate --in trajs.jsonl --out annotated.jsonl [--judge-url URL --judge-model M]
    python -m harness.annotate convert --in step_grained_for_ppo.tsv --out trajs.jsonl   # and .jsonl -> .tsv
    python -m harness.annotate bench        # time the shaping of 1,000 embedded-benchmark episodes

`annotate` shapes each trajectory of our JSONL with reward.shape_batch (the rules, or the LLM judge of
harness.judge at --judge-url) and writes the rows back with their `rewards`; `convert` turns our JSONL
into the original's training TSV and back (formats.py); `bench` times reward.shape_batch and the LCS.
The input files are read and checked whole before any work; a bad line is a DataFileError, "PATH:LINE:
what is wrong", printed as one line with exit status 2, as is a flag out of range (Config).
annotation_rewards turns one entry of the original's per-query annotation JSON into training rewards.
"""
import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, fields

import env
from harness.checks import opt
from harness import toolclient
import reward
from harness.formats import TASK_FILES, convert, load_task_index, load_tasks, read_trajectories
from harness.judge import Judge, annotation_means


def annotation_rewards(ann, alpha=1.0):
    """The training rewards of an annotated episode: shaped r_1 .. r_{T-1}, then r_T = IsSolved."""
    succ, contrib, solved = annotation_means(ann)
    return reward.shaped(succ, contrib, alpha) + [solved]


# ---- annotate: shape recorded trajectories ---------------------------------------------------
def annotate(src, dst, task_files=TASK_FILES, judge=None, **kw):
    """Shape the step rewards of recorded trajectories: JSONL -> the same rows with `rewards`; -> stats.
    A trajectory's task (answer facts, offered functions) is found by query_id and query. Every line
    is read and checked (read_trajectories) before the first is shaped."""
    items, tasks = read_trajectories(src), load_task_index(task_files)
    trajs = [t for _, _, t in items]
    ts = [tasks[t.query_id] if t.query_id in tasks and tasks[t.query_id].query == t.query
          else env.Task(t.query_id, t.query, [], [], t.group, {}) for t in trajs]
    rewards, stats = reward.shape_batch(ts, trajs, judge=judge, **kw)
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({**d, "rewards": r}, ensure_ascii=False) + "\n" for (_, d, _), r in zip(items, rewards))
    return stats


# ---- bench: what shaping costs ---------------------------------------------------------------
def bench(n=1000, runs=3, seed=0):
    """Time shape_batch on n embedded-benchmark episodes (expert replays, 60% perturbed), and the LCS of
    a 1,024 x 2,000-character pair: the original notebook's O(n*m) table against lcs_length."""
    import random
    from harness import server
    rng, tasks, srv, episodes = random.Random(seed), load_tasks(TASK_FILES[0]), server.start_in_thread(), []
    kinds = ["expert"] * 4 + ["bad argument", "unknown function", "unparseable", "fact dropped", "gives up",
                              "no Finish"]
    try:
        client = toolclient.ToolClient(srv.url)
        for i in range(n):
            task, kind = tasks[i % len(tasks)], rng.choice(kinds)
            act = lambda name, args: env.format_action("", name, args)
            texts = [act(s["name"], s["arguments"]) for s in task.expert]
            first, answer = task.expert[0], task.expert[-1]["arguments"]["final_answer"]
            texts = {"bad argument": [act(first["name"], {k: "Nowhere" for k in first["arguments"]})] + texts[1:],
                     "unknown function": [act("lookup_all", {})] + texts, "unparseable": ["I will look."] + texts,
                     "fact dropped": texts[:-1] + [act("Finish", {"return_type": "give_answer",
                                                                  "final_answer": answer.partition(", ")[2]})],
                     "gives up": texts[:-1] + [act("Finish", {"return_type": "give_up_and_restart"})],
                     "no Finish": texts[:-1]}.get(kind, texts)
            e = env.ToolEnv(client)
            e.reset(task)
            for text in texts:
                e.step(text)
            episodes.append((task, e.traj, kind))
    finally:
        srv.shutdown()
    runs_out = [reward.shape_batch([t for t, _, _ in episodes], [j for _, j, _ in episodes]) for _ in range(runs)]
    rewards, stats = runs_out[-1]
    med = statistics.median(s["seconds"] for _, s in runs_out)
    print(f"shape_batch (rules), {n} episodes, {stats['steps']} steps: median of {runs} runs {med * 1e3:.1f} ms, "
          f"{med / n * 1e3:.3f} ms per episode\n  {_fmt(stats)}")
    for kind in dict.fromkeys(k for _, _, k in episodes):
        rs = [r for r, (_, _, k) in zip(rewards, episodes) if k == kind]
        mid = [x for r in rs for x in r[:-1]] or [0.0]
        print(f"  {kind:16s} {len(rs):4d} episodes: mean r_t (t < T) {sum(mid) / len(mid):.3f}, "
              f"mean last reward {sum(r[-1] for r in rs) / len(rs):.3f}")
    chars = "abcdefghijklmnopqrstuvwxyz0123456789 ,.:'\"{}[]-ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    a, b = ("".join(rng.choice(chars) for _ in range(k)) for k in (1024, 2000))
    for name, fn in (("O(n*m) table", reward.lcs_table), ("bit-parallel lcs_length", reward.lcs_length)):
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(a, b)
            ts.append(time.perf_counter() - t0)
        print(f"LCS of 1,024 x 2,000 random characters, {name}: median of {runs} runs "
              f"{statistics.median(ts) * 1e3:.3f} ms")


# ---- command line ---------------------------------------------------------------------------
def _fmt(stats):
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())


@dataclass
class Config:  # `annotate`'s options
    mode: str = opt("stepgrained", "stepgrained | final | module.function (your own reward function)")
    alpha: float = opt(1.0, "alpha: weight of SuccCalling against Contribution (Sec. 4.1)",
                       lambda x: 0 <= x < math.inf, "a finite number >= 0")
    threshold: float = opt(0.3, "Contribution threshold on LCS / response length; 0: the ratio itself",
                           lambda x: 0 <= x <= 1, "in [0, 1]")
    tasks: str = opt(",".join(TASK_FILES), "task files, comma-separated: answer facts, offered functions, prompts")
    judge_url: str = opt("", "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1; empty: rules only")
    judge_model: str = opt("", "the judge's model name at that endpoint")
    judge_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the judge's key (never logged)")
    judge_repeats: int = opt(3, "annotations per episode, averaged", lambda x: x >= 1, "at least 1")
    judge_timeout: float = opt(60.0, "seconds per judge request", lambda x: 0 < x < math.inf, "a finite number > 0")
    judge_retries: int = opt(2, "retries per judge request, with exponential backoff", lambda x: x >= 0, "at least 0")
    workers: int = opt(8, "judge requests in flight", lambda x: x >= 1, "at least 1")


def flag_error(c):
    """The first of Config c's flags out of its range, as one line naming it, or ""."""
    for f in fields(c):
        v = getattr(c, f.name)
        if f.metadata["ok"] and not f.metadata["ok"](v):
            return f"--{f.name.replace('_', '-')} {v}: must be {f.metadata['need']}"
    if c.judge_url and not c.judge_model:
        return "--judge-url needs --judge-model"
    try:
        reward._mode(c.mode)
    except ValueError as e:
        return f"--mode: {e}"
    return ""


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.annotate", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p_ann = sub.add_parser("annotate", help="shape the step rewards of trajectories (JSONL -> JSONL with `rewards`)")
    p_conv = sub.add_parser("convert", help="our trajectory JSONL <-> the original StepTool training TSV")
    p_bench = sub.add_parser("bench", help="time the shaping of embedded-benchmark episodes")
    for p in (p_ann, p_conv):
        p.add_argument("--in", dest="src", required=True)
        p.add_argument("--out", dest="dst", required=True)
    p_conv.add_argument("--tasks", default=Config.tasks, help=Config.__dataclass_fields__["tasks"].metadata["help"])
    for f in fields(Config):
        p_ann.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=f.metadata["help"])
    p_bench.add_argument("--n", type=int, default=1000, help="episodes")
    p_bench.add_argument("--runs", type=int, default=3, help="timed runs (the median is printed)")
    a = ap.parse_args(argv)

    def fail(msg):  # a bad flag or file: one line, status 2, no traceback
        ap.exit(2, f"harness.annotate {a.command}: error: {msg}\n")
    # flags first; then the input files, read whole and checked before any work (convert, annotate)
    if a.command == "bench" and min(a.n, a.runs) < 1:
        fail(f"--n {a.n} --runs {a.runs}: each must be at least 1")
    tasks = [p for p in getattr(a, "tasks", "").split(",") if p]
    missing = [p for p in tasks if not os.path.isfile(p)]
    if missing:
        fail(f"--tasks {missing[0]}: no such file")
    if a.command == "annotate":
        c = Config(**{f.name: getattr(a, f.name) for f in fields(Config)})
        why = flag_error(c)
        if why:
            fail(why)
    try:
        if a.command == "bench":
            bench(a.n, a.runs)
        elif a.command == "convert":
            print(f"{a.dst}: {convert(a.src, a.dst, tasks)} rows")
        else:
            judge = Judge(c.judge_url, c.judge_model, c.judge_key_env, c.judge_repeats, c.judge_timeout,
                          c.judge_retries) if c.judge_url else None
            s = annotate(a.src, a.dst, tasks, judge, mode=c.mode, alpha=c.alpha,
                         contribution_threshold=c.threshold or None, workers=c.workers)
            print(f"{a.dst}: {_fmt(s)}")
    except (ValueError, OSError) as e:  # DataFileError, TaskFileError, an unwritable --out
        fail(e)


if __name__ == "__main__":
    main()
