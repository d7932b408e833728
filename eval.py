"""Evaluation: Pass Rate and Recall per test group, StableToolBench-compatible (paper Sec. 5.1, Table 1).

    python eval.py --model M --tasks FILE ... [--tool-server URL] [--judge-url URL] [--repeats 3]
    python eval.py --labels FILE.json ... [--queries FILE ...] [--groups G ...] [--json]
    python eval.py --bench      # time --labels scoring of six synthetic files, 765 queries in all

Pass Rate (StableToolBench's solvable pass rate, its eval_pass_rate.py): for each judge repeat r,
    score_r = (#Solved + 0.5 * #Unsure) / #queries,
reported as the mean over r (%) and the population standard deviation over r (%).
Recall (the paper's second column; the original never released its code): per query,
    |relevant APIs called at least once| / |relevant APIs|
with APIs compared by ToolBench function name (env.function_name), averaged over queries (%).
Groups as the paper: I1 = mean of G1_instruction, G1_category, G1_tool; I2 = mean of
G2_instruction, G2_category; I3 = G3_instruction; the embedded benchmark's G1 / G2 / G3 are
groups of their own; Avg = the unweighted mean over the groups scored (the paper's "Average").

Both paths meet in one format: a rollout becomes an entry of StableToolBench's pass-rate label
file (query id -> {query, tool_names, answer_steps, final_step, is_solved, length}), and only label
files are scored. So `--labels` reads our files and theirs, and theirs read ours.
Outputs of --model (in --out): <group>.json label files, results.json (the --json object),
results.csv, trajectories.jsonl (env.Trajectory.to_dict(), written before judging). --out must be new,
empty, or an earlier eval.py output (--overwrite replaces only what that wrote; runs.py).

Decisions and departures:
1. Missing repeats: as StableToolBench, a file has R = 1 + its largest repeat index, and a query
   that lacks repeat r counts Unsolved (0) in score_r. (StableToolBench takes R from its
   --evaluate_times flag; a label file only tells us the largest index written.)
2. An answer whose final step is not Finish with return_type give_answer counts Unsolved in every
   repeat, whatever its label says; it is not sent to the judge. StableToolBench checks only
   "'name': 'Finish'" before judging; a give-up has an empty final answer, which its judge
   rules Unsolved, so the numbers agree.
3. The group of a label file is its file stem, or the StableToolBench group the stem contains
   (their evaluator writes <group>_<model>.json); --groups overrides.
4. Step texts are Python literals: parsed with ast.literal_eval, never eval; a truncated step
   falls back to a regex on its 'name'. Relevant APIs are de-duplicated; a query without
   relevant APIs, or absent from --queries, is left out of Recall (and said so).
5. Our label files list the steps that reached a tool (or Finish); turns that could not be parsed
   or named an unknown function made no call and are left out, as ToolBench's converter leaves
   out assistant turns without a function call. So Recall of a trajectory and of its label entry agree.
6. A malformed file is reported (file and query id) and skipped; the other files are still scored.

Left out: StableToolBench's preference (win-rate) evaluation and its GPT judge client; the judge
here is whatever judge_fn is given (reward.py's is_solved on the command line).
"""
import argparse
import ast
import csv
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
from tqdm import tqdm

import env
import runs

MAX_REPEATS = 1000   # judge repeats per answer (StableToolBench's evaluate_times: 3 to 7)
STATUS = {"AnswerStatus.Solved": 1.0, "AnswerStatus.Unsure": 0.5, "AnswerStatus.Unsolved": 0.0}
STATUS_OF = {1: "AnswerStatus.Solved", 0.5: "AnswerStatus.Unsure", 0: "AnswerStatus.Unsolved"}
STB_GROUPS = ["G1_instruction", "G1_category", "G1_tool", "G2_instruction", "G2_category", "G3_instruction"]
PAPER_GROUPS = {"I1": STB_GROUPS[:3], "I2": STB_GROUPS[3:5], "I3": STB_GROUPS[5:]}  # Table 1's columns
JSON_KEYS = ("pass_rate", "pass_rate_std", "n", "repeats", "recall")


class LabelFileError(ValueError):
    pass


# ---- reading StableToolBench label files -----------------------------------------------------
def load_labels(path):
    """A pass-rate label file -> {query id: entry}, each entry checked; errors name file and query."""
    try:
        with open(path) as f:
            labels = json.load(f)
    except (OSError, ValueError) as e:
        raise LabelFileError(f"{path}: cannot read label file: {e}") from None
    if not isinstance(labels, dict) or not labels:
        raise LabelFileError(f"{path}: expected a non-empty JSON object keyed by query id")
    for qid, e in labels.items():
        where = f"{path}: query {qid}"
        if not isinstance(e, dict) or not isinstance(e.get("is_solved"), dict):
            raise LabelFileError(f"{where}: missing 'is_solved' (an object: judge repeat -> AnswerStatus)")
        for key in ("final_step", "answer_steps"):
            if not isinstance(e.get(key), str):
                raise LabelFileError(f"{where}: missing '{key}' (text)")
        for r, s in e["is_solved"].items():
            if not (str(r).isascii() and str(r).isdecimal()) or int(r) >= MAX_REPEATS:
                raise LabelFileError(f"{where}: repeat index {r!r} is not an integer 0 .. {MAX_REPEATS - 1}")
            if s not in STATUS:
                raise LabelFileError(f"{where}: unknown status {s!r} (expected one of {', '.join(STATUS)})")
    if not any(e["is_solved"] for e in labels.values()):
        raise LabelFileError(f"{path}: no judge repeats in any query")
    return labels


def label_group(path, override=None):
    """G2_category.json -> G2_category; G1_tool_toolllama.json -> G1_tool; else the file stem."""
    if override:
        return override
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.search("|".join(STB_GROUPS), stem)
    return m.group(0) if m else stem


_NAME = re.compile(r"""\{\s*['"]name['"]\s*:\s*['"]([^'"]*)['"]""")


def parse_step(text):
    """'Step k: {...}' / 'Final step: {...}' -> dict; a truncated one -> {'name': ...}; None if nameless."""
    body = text.partition(":")[2].strip()
    try:
        d = ast.literal_eval(body)  # data only: literals, never code
        if isinstance(d, dict) and "name" in d:
            return d
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    m = _NAME.search(body[:300])
    return {"name": m.group(1)} if m else None


def step_names(answer_steps):
    """The function names called in an answer_steps text, in order (repeats kept)."""
    steps = re.split(r"\n(?=Step \d+:)", answer_steps.strip()) if answer_steps.strip() else []
    return [d["name"] for d in map(parse_step, steps) if d]


def ends_with_answer(final_step):
    """Does the final step call Finish with return_type give_answer?"""
    d = parse_step(final_step) if final_step else None
    if not d or d["name"] != "Finish":
        return False
    try:  # ToolBench stores the arguments as JSON text
        return json.loads(d["arguments"]).get("return_type") == "give_answer"
    except (KeyError, TypeError, ValueError, AttributeError):  # truncated or odd: the text still says which
        return "give_answer" in final_step


# ---- the two numbers -------------------------------------------------------------------------
def pass_rate(scores):
    """Per-repeat scores [score_r] (fractions) -> (mean %, population std %), as StableToolBench."""
    return sum(scores) / len(scores) * 100, statistics.pstdev(scores) * 100


def recall(called, relevant):
    """|relevant called at least once| / |relevant|; None when there is nothing relevant."""
    relevant = set(relevant)
    return len(relevant & set(called)) / len(relevant) if relevant else None


def called_steps(traj):
    """The steps of our trajectory that reached a tool or Finish (no parse error, known name)."""
    return [s for s in traj.steps if s.name and not s.error]


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


def score_labels(labels, group="", relevant=None):
    """{qid: entry} -> metrics: pass_rate, pass_rate_std (%), n, repeats, recall (% or None), and notes."""
    n = len(labels)
    R = 1 + max(int(r) for e in labels.values() for r in e["is_solved"])  # departure 1
    score, unfinished, missing = [0.0] * R, 0, 0
    for e in labels.values():
        solved = {int(r): s for r, s in e["is_solved"].items()}
        missing += len(solved) < R
        if not ends_with_answer(e["final_step"]):  # departure 2: no Finish give_answer -> Unsolved
            unfinished += any(STATUS[s] > 0 for s in solved.values())
            continue
        for r in range(R):
            score[r] += STATUS[solved[r]] if r in solved else 0.0  # departure 1: missing -> Unsolved
    mean, std = pass_rate([s / n for s in score])
    recalls = [recall(step_names(e["answer_steps"]), rel) for qid, e in labels.items()
               if relevant and (rel := relevant(group, qid))]  # departure 4: no relevant APIs, no Recall
    return {"pass_rate": mean, "pass_rate_std": std, "n": n, "repeats": R,
            "recall": sum(recalls) / len(recalls) * 100 if recalls else None,
            "recall_n": len(recalls) if relevant else None, "overridden": unfinished, "missing_repeats": missing}


def per_query(labels, tasks):
    """{group: {qid: entry}} -> [{group, query_id, pass (0..1), recall (0..1 or None)}], as score_labels
    counts them (an answer that is not Finish give_answer passes no repeat; missing repeats fail)."""
    relevant = relevant_index(tasks)
    out = []
    for g, entries in labels.items():
        R = 1 + max(int(r) for e in entries.values() for r in e["is_solved"])
        for qid, e in entries.items():
            ok = ends_with_answer(e["final_step"])
            rel = relevant(g, qid)
            out.append({"group": g, "query_id": qid,
                        "pass": sum(STATUS[s] for s in e["is_solved"].values()) / R if ok else 0.0,
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
    """[(name, group, metrics)] -> {group: {pass_rate, recall}} with I1 / I2 / I3 and Avg (paper's Table 1)."""
    groups = {}
    for _, g, m in scored:
        if g in groups:  # two files of one group (two models?): no group table, it would mix them
            return {}
        groups[g] = {"pass_rate": m["pass_rate"], "recall": m["recall"]}

    def mean_of(members):
        recalls = [groups[g]["recall"] for g in members]
        return {"pass_rate": statistics.fmean(groups[g]["pass_rate"] for g in members),
                "recall": statistics.fmean(recalls) if None not in recalls else None}
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


# ---- printing and writing --------------------------------------------------------------------
def _pct(x):
    return "-" if x is None else f"{x:.1f}"


def format_table(scored, groups):
    """The paper's table as plain text: group | n | Pass Rate mean ± std | Recall."""
    dup = {g for _, g, _ in scored if sum(g == h for _, h, _ in scored) > 1}
    lines = [f"{'group':<24}{'n':>6}   {'Pass Rate (%)':<16}{'Recall (%)':>10}"]
    for name, g, m in scored:
        label = f"{g} ({name})" if g in dup else g
        lines.append(f"{label:<24}{m['n']:>6}   {_pct(m['pass_rate']) + ' ± ' + _pct(m['pass_rate_std']):<16}"
                     f"{_pct(m['recall']):>10}")
    for g in [g for g in groups if g in PAPER_GROUPS or g == "Avg"]:
        lines.append(f"{g:<24}{'':>6}   {_pct(groups[g]['pass_rate']):<16}{_pct(groups[g]['recall']):>10}")
    for name, g, m in scored:  # what a reader comparing with StableToolBench's own printout should know
        notes = [f"{m['repeats']} judge repeats"]
        if m["missing_repeats"]:
            notes.append(f"queries lacking a repeat: {m['missing_repeats']} (Unsolved there)")
        if m["overridden"]:
            notes.append(f"labelled above Unsolved without Finish give_answer: {m['overridden']} (counted Unsolved)")
        if m["recall_n"] is not None and m["recall_n"] < m["n"]:
            notes.append(f"Recall over {m['recall_n']} of {m['n']} queries (no relevant APIs for the others)")
        lines.append(f"  {name}: " + "; ".join(notes))
    if dup:
        lines.append(f"  no group means: {', '.join(sorted(dup))} given by several files; score one model per call")
    return "\n".join(lines)


def to_json(scored, groups):
    return {"files": {name: {k: m[k] for k in JSON_KEYS} for name, _, m in scored}, "groups": groups}


def to_label(task, traj, statuses):
    """Our trajectory + per-repeat statuses -> one entry of a StableToolBench pass-rate label file."""
    texts = [str({"name": s.name, "arguments": json.dumps(s.arguments, ensure_ascii=False),
                  "response": "" if s.name == "Finish" else s.observation}) for s in called_steps(traj)]
    return {"query": traj.query, "tool_names": [f["name"] for f in task.functions] + ["Finish"],
            "answer_steps": "\n".join(f"Step {k}: {t}" for k, t in enumerate(texts, 1)),
            "final_step": f"Final step: {texts[-1]}" if texts else "",
            "is_solved": {str(r): s for r, s in enumerate(statuses)}, "length": len(texts)}


def write_trajectories(path, trajectories):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for t in trajectories:
            f.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")


def write_outputs(out, labels, scored, groups, run=None):
    """<out>/<group>.json label files (StableToolBench's layout: indent 4), results.json, results.csv.
    run: the claimed --out folder (runs.py), whose marker lists each file before it is written."""
    os.makedirs(out, exist_ok=True)
    if run is not None:
        run.register(*(f"{g}.json" for g in labels), "results.json", "results.csv")
    for g, entries in labels.items():
        with open(os.path.join(out, f"{g}.json"), "w") as f:
            json.dump(entries, f, ensure_ascii=False, indent=4)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(to_json(scored, groups), f, indent=2)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n", "repeats", "pass_rate", "pass_rate_std", "recall"])
        for _, g, m in scored:
            w.writerow([g, m["n"], m["repeats"], m["pass_rate"], m["pass_rate_std"], m["recall"]])
        for g in [g for g in groups if g in PAPER_GROUPS or g == "Avg"]:
            w.writerow([g, "", "", groups[g]["pass_rate"], "", groups[g]["recall"]])


# ---- the model path --------------------------------------------------------------------------
def evaluate(trajectories, tasks, judge_fn, repeats=3, workers=8):
    """Judge finished trajectories -> (labels {group: {qid: entry}}, scored [(file, group, metrics)], groups).

    judge_fn(task, traj) -> 1 | 0.5 | 0 (Solved / Unsure / Unsolved), called `repeats` times per answer
    that ends in Finish give_answer; other answers are Unsolved without a call (departure 2)."""
    by_key = {(t.group, t.query_id): t for t in tasks}

    def judge(traj):
        task = by_key.get((traj.group, traj.query_id))
        if task is None:
            raise KeyError(f"trajectory of query {traj.query_id} (group {traj.group}) has no task")
        scores = [judge_fn(task, traj) for _ in range(repeats)] if traj.finish == "give_answer" else [0] * repeats
        if any(s not in STATUS_OF for s in scores):
            raise ValueError(f"judge_fn returned {scores} for query {traj.query_id}; expected 1, 0.5 or 0")
        return task, traj, [STATUS_OF[s] for s in scores]

    with ThreadPoolExecutor(workers) as pool:  # judges are often remote LLM calls
        judged = list(tqdm(pool.map(judge, trajectories), total=len(trajectories), desc="judge", leave=False))
    labels = {}
    for task, traj, statuses in judged:
        labels.setdefault(task.group, {})[str(task.query_id)] = to_label(task, traj, statuses)
    labels = dict(sorted(labels.items()))
    relevant = relevant_index(tasks)
    scored = [(f"{g}.json", g, score_labels(entries, g, relevant)) for g, entries in labels.items()]
    return labels, scored, group_means(scored)


def run_policy(model, tasks, tool_server, temperature=0.0, max_steps=12, seed=0, batch_size=32,
               max_new_tokens=256, max_context=4096, progress=True):
    """Roll the policy out on tasks -> [env.Trajectory], one per task, in task order.

    model: a policy.Policy, or what policy.load_policy accepts (hub id, folder, our checkpoint,
    "tiny"); tool_server: URL or env.ToolClient; temperature 0 = greedy (the paper's evaluation)."""
    import policy as P
    import rollout
    pol = model if isinstance(model, P.Policy) else P.load_policy(model)
    client = tool_server if isinstance(tool_server, env.ToolClient) else env.ToolClient(tool_server)
    client.check()
    with tqdm(total=len(tasks), desc="eval rollouts", disable=not progress, leave=False) as bar:
        _, trajs = rollout.rollout(pol, tasks, client, seed=seed, iteration=1 << 30,  # an rng stream of its own
                                   max_steps=max_steps, max_new_tokens=max_new_tokens, max_context=max_context,
                                   temperature=temperature, batch_size=batch_size, on_done=bar.update)
    return trajs


def make_judge(judge_url="", judge_model="gpt-4o-mini"):
    """reward.py's is_solved as judge_fn(task, traj) -> 1 | 0.5 | 0.

    Embedded tasks are judged by their answer facts; StableToolBench tasks need --judge-url (an
    OpenAI-compatible endpoint), each of eval's --repeats asking it once. Without one they are
    Unsure (0.5) -- a warning says so, since such numbers are not a pass rate."""
    import reward
    judge = reward.Judge(judge_url, judge_model, repeats=1) if judge_url else None
    warned = []

    def judge_fn(task, traj):
        if judge is None and not task.answer and not warned:
            warned.append(1)
            print("eval.py: warning: no --judge-url; tasks without answer facts are judged Unsure", file=sys.stderr)
        return reward.is_solved(task, traj, judge)
    return judge_fn


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
    judge_url: str = opt("", "OpenAI-compatible judge for StableToolBench tasks (key: $OPENAI_API_KEY)")
    judge_model: str = opt("gpt-4o-mini", "model name sent to the judge")
    repeats: int = opt(3, "judge repeats per answer (StableToolBench's evaluate_times)")
    temperature: float = opt(0.0, "sampling temperature; 0 = greedy, as the paper")
    max_steps: int = opt(12, "actions per episode")
    max_new_tokens: int = opt(256, "tokens per assistant turn")
    seed: int = opt(0, "rollout seed")
    out: str = opt("out/eval", "folder for label files, results.json/.csv, trajectories.jsonl: new or empty")
    overwrite: bool = opt(False, "replace an earlier eval.py output in --out (only what it wrote)")
    labels: tuple = opt((), "score these StableToolBench pass-rate label files instead")
    queries: tuple = opt((), "query files whose 'relevant APIs' give --labels' Recall")
    groups: tuple = opt((), "group names for the --labels files, one per file")
    json: bool = opt(False, "--labels: print one JSON object as the last line")
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
    if a.labels:
        if a.groups and len(a.groups) != len(a.labels):
            sys.exit(f"eval.py: --groups gives {len(a.groups)} names for {len(a.labels)} label files")
        scored, groups, errors = score_paths(a.labels, a.queries, a.groups)
        print(format_table(scored, groups))
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        if a.json:
            print(json.dumps(to_json(scored, groups)))
        return 1 if errors else 0
    if not (a.model and a.tasks):
        sys.exit("eval.py: give --model and --tasks, or --labels, or --bench (see -h)")
    import checks
    try:  # flags and task files before the --out folder or the model
        checks.check_ranges(a, {**{k: checks.RULES[k] for k in ("temperature", "max_steps", "max_new_tokens")},
                                "repeats": checks._rule(1, MAX_REPEATS - 1)})
        checks.check_model(a.model, a.adapters)
        tasks = [t for p in a.tasks for t in env.load_tasks(p)]
        if not tasks:
            raise checks.InputError(f"--tasks {' '.join(a.tasks)}: no tasks")
    except (checks.InputError, env.TaskFileError) as e:
        runs.fail("eval.py", e)
    try:  # --out first (runs.py): never a folder of someone else's, nothing loaded before
        run = runs.claim(a.out, "eval", "--out", overwrite=a.overwrite, entries=("trajectories.jsonl",))
    except runs.RunError as e:
        runs.fail("eval.py", e)
    with run:
        return evaluate_model(a, tasks, run)


def evaluate_model(a, tasks, run):
    """--model on --tasks: rollouts, judging, every output written into the claimed run folder."""
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
        trajectories = run_policy(model, tasks, a.tool_server or srv.url, a.temperature, a.max_steps, a.seed,
                                  max_new_tokens=a.max_new_tokens)
    finally:
        if srv:
            srv.shutdown()
    write_trajectories(os.path.join(a.out, "trajectories.jsonl"), trajectories)  # kept even if judging fails
    labels, scored, groups = evaluate(trajectories, tasks, make_judge(a.judge_url, a.judge_model), a.repeats)
    write_outputs(a.out, labels, scored, groups, run)
    print(format_table(scored, groups))
    print(f"wrote {a.out}/results.json, results.csv, trajectories.jsonl and {len(labels)} label files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
