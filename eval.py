"""Evaluation: Pass Rate and Recall per test group, StableToolBench-compatible (paper Sec. 5.1, Table 1).

    python eval.py --model M --tasks FILE ... [--tool-server URL] [--judge-url URL [--stb-dir STB]] [--repeats 3]
    python eval.py --answers FILE.json ... --judge-url URL [--stb-dir STB] [--queries FILE ...] [--json]
    python eval.py --labels FILE.json ... [--queries FILE ...] [--groups G ...] [--json]
    python eval.py --bench      # time --labels scoring of six synthetic files, 765 queries in all

Pass Rate (StableToolBench's solvable pass rate, its eval_pass_rate.py): for each judge repeat r,
    score_r = (#Solved + 0.5 * #Unsure) / #queries,
reported as the mean over r (%) and the population std over r (%) -- judge noise -- beside a 95%
bootstrap CI over queries (each query's mean over the repeats, resampled) -- task sampling; with the
Solved / Unsure / Unsolved counts and, from judge.py's chain, the majority pass rate. Recall (the
paper's second column; the original never released its code): per query |relevant APIs called at
least once| / |relevant APIs|, by ToolBench function name (env.function_name), averaged (%). Groups
as the paper: I1 = mean of G1_instruction, G1_category, G1_tool; I2 = mean of G2_instruction,
G2_category; I3 = G3_instruction; the embedded G1 / G2 / G3 stand alone; Avg = the unweighted mean.

--judge (judge.py): `facts`, the embedded benchmark's answer facts, locally (tasks without facts:
reward.py's annotator at --judge-url, our prompt); `stabletoolbench`, StableToolBench's decision chain
at --judge-url, with its own prompts from --stb-dir (else ours, every output marked not comparable);
`auto`: stabletoolbench when --judge-url is given and a task lacks facts. --answers judges saved
answers with the chain: StableToolBench's converted answers or label files (ours or theirs; their
is_solved ignored). Every path meets in StableToolBench's label file (formats.py), and only label
files are scored: --labels reads ours and theirs, theirs read ours. Outputs in --out (new, empty or
an earlier eval.py output; --overwrite replaces only what that wrote, runs.py): <group>.json label
files, results.json (the --json object, with the judge's model, endpoint, prompts and errors),
results.csv, and for --model trajectories.jsonl, written before judging.

Decisions and departures:
1. Missing repeats: as StableToolBench, a file has R = 1 + its largest repeat index, and a query
   that lacks repeat r counts Unsolved (0) in score_r.
2. An answer whose final step is not Finish give_answer counts Unsolved in every repeat, whatever its
   label says (the facts judge is not asked). StableToolBench checks only "'name': 'Finish'", but a
   give-up's empty final answer is Unsolved there too, so the numbers agree.
3. A label file's group is its file stem, or the StableToolBench group the stem contains (their
   evaluator writes <group>_<model>.json); --groups overrides.
4. Relevant APIs are de-duplicated; a query without any, or absent from --queries, has no Recall.
5. A malformed --labels file is reported and skipped, the others still scored; a malformed --answers
   file stops the run (status 2) before the judge is asked anything.
6. Judge failures are never a score: a query whose judge still fails after its retries is a judge
   error, left out of its label file, of n and of the rate, counted per group (judge_errors; the
   messages in results.json), and the command exits with status 1; a group of judge errors alone has
   no rate. (StableToolBench's evaluator stops the run; our facts judge used to score it 0.5.)
Left out: the preference (win-rate) evaluation; CIs of group means (compare.py: paired CIs of runs).
"""
import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields

import numpy as np
from tqdm import tqdm

import env
import formats
import judge as J
import runs
from formats import write_trajectories
from judge import FactsJudge as make_judge  # noqa: F401  (steptool.py's name)
# the label-file format moved to formats.py; these names stay importable from here
from formats import (MAX_REPEATS, STATUS, STATUS_OF, STB_GROUPS, LabelFileError, called_steps,  # noqa: F401
                     ends_with_answer, label_group, load_labels, parse_step, step_names, to_label)

PAPER_GROUPS = {"I1": STB_GROUPS[:3], "I2": STB_GROUPS[3:5], "I3": STB_GROUPS[5:]}  # Table 1's columns
JSON_KEYS = ("pass_rate", "pass_rate_std", "n", "repeats", "recall")
DETAIL_KEYS = ("pass_rate_ci", "answer_status", "majority_pass_rate", "majority_pass_rate_ci", "judge_errors",
               "missing_repeats", "overridden", "recall_n")


# ---- the numbers -----------------------------------------------------------------------------
def pass_rate(scores):
    """Per-repeat scores [score_r] (fractions) -> (mean %, population std %), as StableToolBench."""
    return sum(scores) / len(scores) * 100, statistics.pstdev(scores) * 100


def bootstrap_ci(values, n=2000, seed=0, level=0.95):
    """95% percentile-bootstrap CI (%) of the mean of per-query values in [0, 1], queries resampled."""
    v = np.asarray(values, dtype=float)
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n, len(v)))].mean(axis=1) * 100  # [n]
    return [float(x) for x in np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])]


def recall(called, relevant):
    """|relevant called at least once| / |relevant|; None when there is nothing relevant."""
    relevant = set(relevant)
    return len(relevant & set(called)) / len(relevant) if relevant else None


def trajectory_recall(traj, task):
    return recall([s.name for s in called_steps(traj)], task.relevant)


def relevant_index(tasks):
    """[Task] -> lookup(group, query id) -> relevant function names, or None if unknown/ambiguous."""
    index = {}
    for t in tasks:
        index.setdefault(str(t.query_id), {})[t.group] = t.relevant
    def lookup(group, qid):  # ids can repeat across groups: prefer the label file's group
        by_group = index.get(str(qid), {})
        return by_group.get(group, next(iter(by_group.values())) if len(by_group) == 1 else None)
    return lookup


def query_scores(e, R):
    """One label entry -> [its score in repeat r] for r < R: 0 without Finish give_answer (departure 2)
    or where the repeat is missing (departure 1)."""
    ok, solved = ends_with_answer(e["final_step"]), {int(r): s for r, s in e["is_solved"].items()}
    return [STATUS[solved[r]] if ok and r in solved else 0.0 for r in range(R)]


def score_labels(labels, group="", relevant=None, judge_errors=0):
    """{qid: entry} -> metrics: pass_rate, pass_rate_std, pass_rate_ci (%), n, repeats, recall (% or
    None), answer_status counts, majority_pass_rate(_ci) (% or None), judge_errors, and notes."""
    out = {"n": len(labels), "judge_errors": judge_errors, "recall_n": None}
    if not labels:  # every query a judge error: no rate
        return {**out, **dict.fromkeys(("pass_rate", "pass_rate_std", "pass_rate_ci", "recall", "majority_pass_rate",
                                        "majority_pass_rate_ci")), "repeats": 0, "answer_status": {},
                "overridden": 0, "missing_repeats": 0}
    R = 1 + max([int(r) for e in labels.values() for r in e["is_solved"]], default=0)  # departure 1
    each = [query_scores(e, R) for e in labels.values()]                                # [n][R]
    counts = dict.fromkeys(("Solved", "Unsure", "Unsolved"), 0)
    for e in labels.values():
        for s in e["is_solved"].values():
            counts["Unsolved" if not ends_with_answer(e["final_step"]) else s.split(".")[-1]] += 1
    mean, std = pass_rate([sum(q[r] for q in each) / len(each) for r in range(R)])
    votes = [e["failed"] <= e["passed"] for e in labels.values() if isinstance(e.get("passed"), int)]
    majority = votes if len(votes) == len(labels) else None                             # step 6 (judge.py)
    recalls = [recall(step_names(e["answer_steps"]), rel) for qid, e in labels.items()
               if relevant and (rel := relevant(group, qid))]  # departure 4: no relevant APIs, no Recall
    return {**out, "pass_rate": mean, "pass_rate_std": std, "pass_rate_ci": bootstrap_ci([sum(q) / R for q in each]),
            "repeats": R, "recall": sum(recalls) / len(recalls) * 100 if recalls else None,
            "recall_n": len(recalls) if relevant else None, "answer_status": counts,
            "majority_pass_rate": 100 * sum(majority) / len(majority) if majority else None,
            "majority_pass_rate_ci": bootstrap_ci(majority) if majority else None,
            "overridden": sum(any(STATUS[s] > 0 for s in e["is_solved"].values()) and not ends_with_answer(e["final_step"])
                              for e in labels.values()),
            "missing_repeats": sum(len(e["is_solved"]) < R for e in labels.values())}


def per_query(labels, tasks):
    """{group: {qid: entry}} -> [{group, query_id, pass (0..1), recall (0..1 or None)}], as score_labels
    counts them. Judge errors are in no label file, so in none of these either."""
    relevant = relevant_index(tasks)
    out = []
    for g, entries in labels.items():
        R = 1 + max(int(r) for e in entries.values() for r in e["is_solved"])
        for qid, e in entries.items():
            rel = relevant(g, qid)
            out.append({"group": g, "query_id": qid, "pass": sum(query_scores(e, R)) / R,
                        "recall": recall(step_names(e["answer_steps"]), rel) if rel else None})
    return out


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
        means[g] = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)   # [n] resampled mean differences
    means["overall"] = np.mean([means[g] for g in groups], axis=0)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {g: [float(x) for x in np.percentile(m, q)] for g, m in means.items()}


def group_means(scored):
    """[(name, group, metrics)] -> {group: {pass_rate, recall}} with I1 / I2 / I3 and Avg (paper's Table 1);
    a member without a rate (or a Recall) leaves the mean without one."""
    groups = {}
    for _, g, m in scored:
        if g in groups:  # two files of one group (two models?): no group table, it would mix them
            return {}
        groups[g] = {"pass_rate": m["pass_rate"], "recall": m["recall"]}

    def mean_of(members):
        vals = {k: [groups[g][k] for g in members] for k in ("pass_rate", "recall")}
        return {k: statistics.fmean(v) if None not in v else None for k, v in vals.items()}
    base = list(groups)
    for name, members in PAPER_GROUPS.items():
        if all(g in groups for g in members):
            groups[name] = mean_of(members)
    if len(base) > 1:
        groups["Avg"] = mean_of(base)
    return groups


def score_paths(label_paths, query_paths=(), group_names=()):
    """The --labels path: -> (scored [(path, group, metrics)], groups, errors [str]); bad files skipped."""
    errors, tasks = [], []
    for p in query_paths:
        try:
            tasks += env.load_tasks(p)
        except env.TaskFileError as e:
            errors.append(str(e))
    relevant = relevant_index(tasks) if tasks else None
    scored = []
    for i, p in enumerate(label_paths):
        g = label_group(p, group_names[i] if group_names else None)
        try:
            scored.append((p, g, score_labels(load_labels(p), g, relevant)))
        except LabelFileError as e:
            errors.append(str(e))
    return scored, group_means(scored), errors


def score_groups(labels, errors, tasks, names=None):
    """Judged {group: {qid: entry}} and judge errors {group: {qid: message}} -> (scored, groups)."""
    relevant = relevant_index(tasks)
    scored = [((names or {}).get(g, f"{g}.json"), g, score_labels(labels.get(g, {}), g, relevant, len(errors.get(g, {}))))
              for g in sorted(set(labels) | set(errors))]
    if errors:
        first = next(iter(next(iter(errors.values())).values()))
        print(f"eval.py: the judge failed on {sum(map(len, errors.values()))} answers, left out of the Pass Rate "
              f"(judge_errors); first: {first}", file=sys.stderr)
    return scored, group_means(scored)


# ---- printing and writing --------------------------------------------------------------------
def _pct(x):
    return "-" if x is None else f"{x:.1f}"


def format_table(scored, groups, judge=None):
    """The paper's table as plain text: group | n | Pass Rate mean ± std | 95% CI | Recall, and notes."""
    dup = {g for _, g, _ in scored if sum(g == h for _, h, _ in scored) > 1}
    lines = [f"{'group':<24}{'n':>6}   {'Pass Rate (%)':<16}{'95% CI':<16}{'Recall (%)':>10}"]
    for name, g, m in scored:
        ci = m.get("pass_rate_ci")
        lines.append(f"{g + f' ({name})' if g in dup else g:<24}{m['n']:>6}   "
                     f"{_pct(m['pass_rate']) + ' ± ' + _pct(m['pass_rate_std']):<16}"
                     f"{f'[{ci[0]:.1f}, {ci[1]:.1f}]' if ci else '-':<16}{_pct(m['recall']):>10}")
    for g in [g for g in groups if g in PAPER_GROUPS or g == "Avg"]:
        lines.append(f"{g:<24}{'':>6}   {_pct(groups[g]['pass_rate']):<32}{_pct(groups[g]['recall']):>10}")
    for name, g, m in scored:  # what a reader comparing with StableToolBench's own printout should know
        notes = [f"{m['repeats']} judge repeats"] + [f"{k} {v}" for k, v in m["answer_status"].items()]
        if m["majority_pass_rate"] is not None:
            notes.append(f"majority pass rate {_pct(m['majority_pass_rate'])} % "
                         f"[{m['majority_pass_rate_ci'][0]:.1f}, {m['majority_pass_rate_ci'][1]:.1f}]")
        if m["judge_errors"]:
            notes.append(f"JUDGE ERRORS: {m['judge_errors']} queries (left out of n and the rate)")
        if m["missing_repeats"]:
            notes.append(f"queries lacking a repeat: {m['missing_repeats']} (Unsolved there)")
        if m["overridden"]:
            notes.append(f"labelled above Unsolved without Finish give_answer: {m['overridden']} (counted Unsolved)")
        if m["recall_n"] is not None and m["recall_n"] < m["n"]:
            notes.append(f"Recall over {m['recall_n']} of {m['n']} queries (no relevant APIs for the others)")
        lines.append(f"  {name}: " + "; ".join(notes))
    if dup:
        lines.append(f"  no group means: {', '.join(sorted(dup))} given by several files; score one model per call")
    if judge:
        lines.append(f"  judge: {judge['kind']}, {judge['model'] or '-'} at {judge['url'] or '-'}; prompts: {judge['prompts']}")
    return "\n".join(lines)


def to_json(scored, groups, judge=None, errors=None):
    out = {"files": {name: {k: m[k] for k in JSON_KEYS} for name, _, m in scored}, "groups": groups,
           "detail": {name: {k: m.get(k) for k in DETAIL_KEYS} for name, _, m in scored}}
    if judge:
        out["judge"] = {**judge, "errors": errors or {}}
    return out


def write_outputs(out, labels, scored, groups, run=None, judge=None, errors=None):
    """<out>/<group>.json label files (StableToolBench's layout: indent 4), results.json, results.csv.
    run: the claimed --out folder (runs.py), whose marker lists each file before it is written."""
    os.makedirs(out, exist_ok=True)
    if run is not None:
        run.register(*(f"{g}.json" for g in labels), "results.json", "results.csv")
    for g, entries in labels.items():
        with open(os.path.join(out, f"{g}.json"), "w") as f:
            json.dump(entries, f, ensure_ascii=False, indent=4)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(to_json(scored, groups, judge, errors), f, indent=2)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n", "repeats", "pass_rate", "pass_rate_std", "recall"])
        for _, g, m in scored:
            w.writerow([g, m["n"], m["repeats"], m["pass_rate"], m["pass_rate_std"], m["recall"]])
        for g in [g for g in groups if g in PAPER_GROUPS or g == "Avg"]:
            w.writerow([g, "", "", groups[g]["pass_rate"], "", groups[g]["recall"]])


# ---- judging ---------------------------------------------------------------------------------
def evaluate(trajectories, tasks, judge_fn, repeats=3, workers=8, errors=None):
    """Judge finished trajectories (judge.judge_trajectories: judge_fn(task, traj) -> 1 | 0.5 | 0, asked
    `repeats` times per answer that ends in Finish give_answer; departure 2) -> (labels {group: {qid:
    entry}}, scored [(file, group, metrics)], groups). A judge_fn that raises judge.JudgeError makes
    that query a judge error (departure 6), its message put in `errors` {group: {qid: message}}."""
    labels, errs = J.judge_trajectories(trajectories, tasks, judge_fn, repeats, workers)
    if errors is not None:
        errors.update(errs)
    return labels, *score_groups(labels, errs, tasks)


def run_policy(model, tasks, tool_server, temperature=0.0, max_steps=12, seed=0, batch_size=32,
               max_new_tokens=256, max_context=4096, progress=True, first_episode=0, obs_chars=1024):
    """Roll the policy out on tasks -> [env.Trajectory], one per task, in task order.

    model: a policy.Policy, or what policy.load_policy accepts (hub id, folder, our checkpoint,
    "tiny"); tool_server: URL or env.ToolClient; temperature 0 = greedy (the paper's evaluation).
    first_episode: the index of tasks[0] in the whole evaluation (a rank's block of it, steptool.py):
    episode i samples from the generator of (seed, eval, first_episode + i)."""
    import policy as P
    import rollout
    pol = model if isinstance(model, P.Policy) else P.load_policy(model)
    client = tool_server if isinstance(tool_server, env.ToolClient) else env.ToolClient(tool_server)
    client.check()
    with tqdm(total=len(tasks), desc="eval rollouts", disable=not progress, leave=False) as bar:
        _, trajs = rollout.rollout(pol, tasks, client, seed=seed, iteration=1 << 30,  # an rng stream of its own
                                   first_episode=first_episode, max_steps=max_steps, max_new_tokens=max_new_tokens,
                                   max_context=max_context, temperature=temperature, batch_size=batch_size, obs_chars=obs_chars,
                                   on_done=bar.update)
    return trajs


# ---- the benchmark of the scorer -------------------------------------------------------------
def bench(runs=5):
    """Six synthetic label + query files, StableToolBench's group sizes (765 queries), ~1 KB responses."""
    rng, qid, paths = random.Random(0), 0, ([], [])
    with tempfile.TemporaryDirectory() as d:
        for g, n in zip(STB_GROUPS, [163, 153, 158, 106, 124, 61]):
            queries, labels = [], {}
            for qid in range(qid + 1, qid + n + 1):
                apis = [[f"Tool {qid % 7} {j}", f"api {k}"] for j in range(2) for k in range(3)]
                names = [env.function_name(t, a) for t, a in apis]
                queries.append({"query_id": qid, "query": "q", "relevant APIs": apis[:2], "api_list": [
                    {"category_name": "Data", "tool_name": t, "api_name": a} for t, a in apis]})
                response = lambda: json.dumps({"error": "", "response": "".join(rng.choices("ab ,:{}'", k=1000))})
                steps = [str({"name": rng.choice(names), "arguments": json.dumps({"x": rng.random()}),
                              "response": response()}) for _ in range(rng.randint(2, 8))]
                done = rng.random() < 0.7  # the others end without Finish: Unsolved, as StableToolBench labels them
                if done:
                    steps.append(str({"name": "Finish", "response": "", "arguments": json.dumps(
                        {"return_type": "give_answer", "final_answer": "an answer " * 20})}))
                solved = {str(r): rng.choice(list(STATUS)) if done else "AnswerStatus.Unsolved" for r in range(3)}
                labels[str(qid)] = {"query": "q", "tool_names": names + ["Finish"], "is_solved": solved,
                                    "answer_steps": "\n".join(f"Step {k}: {s}" for k, s in enumerate(steps, 1)),
                                    "final_step": "Final step: " + steps[-1], "length": len(steps)}
            for path, obj, out in ((f"{d}/{g}.json", labels, paths[0]), (f"{d}/{g}_q.json", queries, paths[1])):
                with open(path, "w") as f:
                    json.dump(obj, f, indent=4)
                out.append(path)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            scored, groups, errors = score_paths(*paths)
            times.append(time.perf_counter() - t0)
    assert not errors and sum(m["n"] for _, _, m in scored) == 765
    print(format_table(scored, groups))
    print(f"bench: 6 label files, 765 queries, Pass Rate and Recall: "
          f"median {statistics.median(times):.3f} s of {runs} runs")
    return statistics.median(times)


# ---- command line ----------------------------------------------------------------------------
def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    model: str = opt("", "policy: what policy.load_policy accepts, or a checkpoint folder of ours")
    adapters: tuple = opt((), "adapter files (LoRA + value head) put on --model in order, each but the last merged")
    tasks: tuple = opt((), "task files: StableToolBench query files or data/bench_test.json")
    tool_server: str = opt("", "tool server URL; empty: start the embedded one")
    judge: str = opt("auto", "facts | stabletoolbench | auto (stabletoolbench if --judge-url and a task lacks facts)")
    judge_url: str = opt("", "OpenAI-compatible judge endpoint, e.g. https://api.openai.com/v1")
    judge_model: str = opt("gpt-4o-mini", "model name sent to the judge (StableToolBench's: gpt-4-turbo-2024-04-09)")
    judge_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the judge's key (never logged)")
    stb_dir: str = opt("", "a StableToolBench checkout: its pass-rate prompts, read at run time; empty: ours")
    judge_temperature: float = opt(0.0, "judge sampling temperature (StableToolBench's default config: 0.2)")
    judge_retries: int = opt(2, "retries per judge request, with exponential backoff")
    judge_timeout: float = opt(60.0, "seconds per judge request")
    judge_workers: int = opt(8, "judge requests in flight")
    repeats: int = opt(3, "judge repeats per answer (StableToolBench's evaluate_times)")
    temperature: float = opt(0.0, "sampling temperature; 0 = greedy, as the paper")
    max_steps: int = opt(12, "actions per episode")
    max_new_tokens: int = opt(256, "tokens per assistant turn")
    obs_chars: int = opt(1024, "tool responses are cut to this many characters (steptool.py's --obs-chars of the run)")
    seed: int = opt(0, "rollout seed, and the seed of the judge's coin flips")
    out: str = opt("out/eval", "folder for label files, results.json/.csv (and trajectories.jsonl): new or empty")
    overwrite: bool = opt(False, "replace an earlier eval.py output in --out (only what it wrote)")
    answers: tuple = opt((), "judge these saved answers (StableToolBench converted answers or label files)")
    labels: tuple = opt((), "score these StableToolBench pass-rate label files instead")
    queries: tuple = opt((), "query files whose 'relevant APIs' give Recall of --labels / --answers")
    groups: tuple = opt((), "group names for the --labels / --answers files, one per file")
    json: bool = opt(False, "--labels / --answers: print one JSON object as the last line")
    bench: bool = opt(False, "time --labels on six synthetic files (765 queries)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Args):
        kw = {"action": "store_true"} if f.type is bool else {"nargs": "+"} if f.type is tuple else {"type": f.type}
        ap.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"], **kw)
    return Args(**vars(ap.parse_args(argv)))


def main(argv=None):
    a = parse_args(argv)
    if a.bench:
        return 0 if bench() < 2.0 else 1
    if a.groups and len(a.groups) != len(a.labels or a.answers):
        sys.exit(f"eval.py: --groups gives {len(a.groups)} names for {len(a.labels or a.answers)} files")
    if a.labels:
        scored, groups, errors = score_paths(a.labels, a.queries, a.groups)
        print(format_table(scored, groups))
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        if a.json:
            print(json.dumps(to_json(scored, groups)))
        return 1 if errors else 0
    if not (a.answers or (a.model and a.tasks)):
        sys.exit("eval.py: give --model and --tasks, or --answers, or --labels, or --bench (see -h)")
    import checks
    try:  # flags, input files and the judge's prompts before the --out folder, the model or the judge
        checks.check_ranges(a, {**{k: checks.RULES[k] for k in ("temperature", "max_steps", "max_new_tokens", "obs_chars")},
                                "judge_temperature": checks.NONNEG, "judge_retries": checks.NONNEG,
                                "judge_timeout": checks.POSITIVE, "judge_workers": checks.ONE_UP,
                                "repeats": checks.rule(1, MAX_REPEATS - 1)})
        if a.judge not in ("auto", "facts", "stabletoolbench"):
            raise checks.InputError(f"--judge {a.judge}: use one of auto, facts, stabletoolbench")
        if a.answers and (a.judge == "facts" or not a.judge_url):
            raise checks.InputError("--answers needs --judge-url (and --judge auto or stabletoolbench): saved answers "
                                    "have no answer facts")
        if not a.answers:
            checks.check_model(a.model, a.adapters)
        tasks = [t for p in (a.queries if a.answers else a.tasks) for t in env.load_tasks(p)]
        if not (tasks or a.answers):
            raise checks.InputError(f"--tasks {' '.join(a.tasks)}: no tasks")
        items, names = formats.read_answers(a.answers, a.groups) if a.answers else ([], None)
        chain = a.judge == "stabletoolbench" or (a.judge == "auto" and a.judge_url and (
            a.answers or not all(t.answer for t in tasks)))
        if chain and not a.judge_url:
            raise checks.InputError("--judge stabletoolbench needs --judge-url")
        if not a.judge_url and not all(t.answer for t in tasks):   # never a constant 0.5 called a pass rate
            raise checks.InputError(f"--tasks {' '.join(a.tasks)}: {sum(not t.answer for t in tasks)} tasks have no answer "
                                    "facts to judge by: give --judge-url")
        kw = dict(key_env=a.judge_key_env, timeout=a.judge_timeout, retries=a.judge_retries)
        judge = J.PassRateJudge(a.judge_url, a.judge_model, a.stb_dir, a.judge_temperature, **kw) if chain \
            else J.FactsJudge(a.judge_url, a.judge_model, **kw)
    except ValueError as e:  # checks.InputError, env.TaskFileError, formats.LabelFileError, a bad --stb-dir
        runs.fail("eval.py", e)
    try:  # --out first (runs.py): never a folder of someone else's, nothing loaded before
        run = runs.claim(a.out, "eval", "--out", overwrite=a.overwrite, entries=() if a.answers else ("trajectories.jsonl",))
    except runs.RunError as e:
        runs.fail("eval.py", e)
    with run:
        if not a.answers:
            trajectories = evaluate_model(a, tasks)
            write_trajectories(os.path.join(a.out, "trajectories.jsonl"), trajectories)  # kept if judging fails
        if chain and not a.answers:  # the model's answers, judged as saved answers are
            by_key = {(t.group, t.query_id): t for t in tasks}
            items = [(t.group, t.query_id, formats.traj_to_example(by_key[(t.group, t.query_id)], t)) for t in trajectories]
        if chain:
            labels, errors = J.judge_answers(items, judge, a.repeats, a.seed, a.judge_workers)
            scored, groups = score_groups(labels, errors, tasks, names)
        else:
            errors = {}
            labels, scored, groups = evaluate(trajectories, tasks, judge, a.repeats, errors=errors)
        info = {**judge.describe(), "repeats": a.repeats, "seed": a.seed}  # the seed of the coin flips
        write_outputs(a.out, labels, scored, groups, run, info, errors)
        print(format_table(scored, groups, info))
        print(f"wrote {a.out}/results.json, results.csv, {'' if a.answers else 'trajectories.jsonl, '}"
              f"{len(labels)} label files")
        if a.json:
            print(json.dumps(to_json(scored, groups, info, errors)))
        return 1 if errors else 0


def evaluate_model(a, tasks):
    """--model's rollouts on --tasks (the embedded tool server unless --tool-server) -> [env.Trajectory]."""
    srv = None
    if not a.tool_server:
        import server
        srv = server.start_in_thread()
    try:
        import policy as P
        try:
            model = P.load_policy(a.model, adapters=tuple(a.adapters)) if a.adapters else a.model
        except (ValueError, OSError) as e:
            sys.exit(f"eval.py: {e}")
        return run_policy(model, tasks, a.tool_server or srv.url, a.temperature, a.max_steps, a.seed,
                          max_new_tokens=a.max_new_tokens, obs_chars=a.obs_chars)
    finally:
        if srv:
            srv.shutdown()


if __name__ == "__main__":
    sys.exit(main())
