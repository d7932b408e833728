"""Evaluation: Pass Rate and Recall per test group, StableToolBench-compatible (paper Sec. 5.1, Table 1).

    python eval.py --model M --tasks FILE ... [--tool-server URL] [--judge-url URL [--stb-dir STB]] [--repeats 3]
    python eval.py --answers FILE.json ... --judge-url URL [--stb-dir STB] [--queries FILE ...] [--json]
    python eval.py --labels FILE.json ... [--queries FILE ...] [--groups G ...] [--json]
    python eval.py --bench      # time --labels scoring of six synthetic files, 765 queries in all

Pass Rate (StableToolBench's solvable pass rate, its eval_pass_rate.py): for each judge repeat r,
    score_r = (#Solved + 0.5 * #Unsure) / #queries,
reported as the mean over r (%) and the population std over r (%) -- judge noise -- beside a 95%
bootstrap CI over queries (each query's mean over the repeats, resampled) -- task sampling; with the
Solved / Unsure / Unsolved counts and, from harness/judge.py's chain, the majority pass rate. Recall (the
paper's second column; the original never released its code): per query |relevant APIs called at
least once| / |relevant APIs|, by ToolBench function name (env.function_name), averaged (%). Groups
as the paper: I1 = mean of G1_instruction, G1_category, G1_tool; I2 = mean of G2_instruction,
G2_category; I3 = G3_instruction; the embedded G1 / G2 / G3 stand alone; Avg = the unweighted mean.

This file holds the numbers (score_labels of one label file, group_means of Table 1's columns, on
StableToolBench's label entries) and run_policy (the rollouts). A judge turns answers into label
entries (harness/judge.py: the facts judge, or StableToolBench's LLM chain); the command line -- the
judges, the input files, the outputs in --out, the exit statuses -- is harness/evaluate.py.

Decisions and departures:
1. Missing repeats: as StableToolBench, a file has R = 1 + its largest repeat index, and a query
   that lacks repeat r counts Unsolved (0) in score_r.
2. An answer whose final step is not Finish give_answer counts Unsolved in every repeat, whatever its
   label says (the facts judge is not asked). StableToolBench checks only "'name': 'Finish'", but a
   give-up's empty final answer is Unsolved there too, so the numbers agree.
3. A label file's group is its file stem, or the StableToolBench group the stem contains (their
   evaluator writes <group>_<model>.json); --groups overrides.
4. Relevant APIs are de-duplicated; a query without any, or absent from --queries, has no Recall.
5. A malformed --labels file (or one whose values trip the scoring) is reported and skipped, the others
   still scored; a malformed --answers file stops the run before the judge is asked (harness/evaluate.py).
6. Judge failures are never a score: a query whose judge still fails after its retries is a judge
   error, left out of its label file, of n and of the rate, counted per group (judge_errors; the
   messages in results.json), and the command exits with status 1; a group of judge errors alone has
   no rate. (StableToolBench's evaluator stops the run; a facts judge that scored it 0.5 would hide it.)
Left out: the preference (win-rate) evaluation; CIs of group means (harness/compare.py: paired CIs of runs).
"""
import ast
import json
import re
import statistics
import sys

import numpy as np
from tqdm import tqdm

STATUS = {"AnswerStatus.Solved": 1.0, "AnswerStatus.Unsure": 0.5, "AnswerStatus.Unsolved": 0.0}  # a judge's label -> score
STB_GROUPS = ["G1_instruction", "G1_category", "G1_tool", "G2_instruction", "G2_category", "G3_instruction"]
PAPER_GROUPS = {"I1": STB_GROUPS[:3], "I2": STB_GROUPS[3:5], "I3": STB_GROUPS[5:]}  # Table 1's columns
MAX_CONTEXT = 4096  # tokens per episode in run_policy (steptool.py's --max-context default)


# ---- a label entry, as StableToolBench writes it: its steps as text ----------------------------
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


def split_steps(answer_steps):
    return re.split(r"\n(?=Step \d+:)", answer_steps.strip()) if answer_steps.strip() else []


def step_names(answer_steps):
    """The function names called in an answer_steps text, in order (repeats kept)."""
    return [d["name"] for d in map(parse_step, split_steps(answer_steps)) if d]


def ends_with_answer(final_step):
    """Does the final step call Finish with return_type give_answer?"""
    d = parse_step(final_step) if final_step else None
    if not d or d["name"] != "Finish":
        return False
    try:  # ToolBench stores the arguments as JSON text
        return json.loads(d["arguments"]).get("return_type") == "give_answer"
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError):  # truncated or odd: the text says
        return "give_answer" in final_step


def called_steps(traj):
    """The steps of our trajectory that reached a tool or Finish (no parse error, known name)."""
    return [s for s in traj.steps if s.name and not s.error]


# ---- the numbers -----------------------------------------------------------------------------
def pass_rate(scores):
    """Per-repeat scores [score_r] (fractions) -> (mean %, population std %), as StableToolBench."""
    return sum(scores) / len(scores) * 100, statistics.pstdev(scores) * 100


def resampled_means(v, n, rng, block=1 << 20):
    """[n] means of v [m] resampled with replacement: the n x m draws of one rng.integers(0, m, (n, m)),
    made a block of rows at a time (about `block` indices, 16 MB with their values) so that memory does
    not grow with n x m: 2,000 resamples of 100,000 queries at once were 3.2 GB. The rows come from one
    stream in the same order and each row's mean is summed alone, so the means are bit-for-bit those of
    the single draw."""
    rows = max(1, block // max(1, len(v)))
    return np.concatenate([v[rng.integers(0, len(v), size=(min(rows, n - i), len(v)))].mean(axis=1)  # [rows]
                           for i in range(0, n, rows)])


def bootstrap_ci(values, n=2000, seed=0, level=0.95):
    """95% percentile-bootstrap CI (%) of the mean of per-query values in [0, 1], queries resampled."""
    v = np.asarray(values, dtype=float)
    means = resampled_means(v, n, np.random.default_rng(seed)) * 100                   # [n]
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
    majority = votes if len(votes) == len(labels) else None                             # step 6 (harness/judge.py)
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


# ---- the rollouts ---------------------------------------------------------------------------
def run_policy(policy, tasks, client, temperature=0.0, max_steps=12, seed=0, batch_size=32,
               max_new_tokens=256, max_context=MAX_CONTEXT, progress=True, first_episode=0, obs_chars=1024):
    """Roll the policy (a policy.Policy) out on tasks -> [env.Trajectory], one per task, in task order.

    client: the tool server's (harness/toolclient.py); temperature 0 = greedy (the paper's evaluation).
    first_episode: the index of tasks[0] in the whole evaluation (a rank's block of it under torchrun, harness/dist.py):
    episode i samples from the generator of (seed, eval, first_episode + i)."""
    import rollout  # here: `python eval.py --labels` never imports torch
    client.check()
    with tqdm(total=len(tasks), desc="eval rollouts", disable=not progress, leave=False) as bar:
        _, trajs = rollout.rollout(policy, tasks, client, seed=seed, iteration=1 << 30,  # an rng stream of its own
                                   first_episode=first_episode, max_steps=max_steps, max_new_tokens=max_new_tokens,
                                   max_context=max_context, temperature=temperature, batch_size=batch_size, obs_chars=obs_chars,
                                   on_done=bar.update)
    return trajs


# ---- command line ----------------------------------------------------------------------------
def main(argv=None):
    from harness import evaluate  # the flags, input files, judges and outputs: harness/evaluate.py
    return evaluate.main(argv)


if __name__ == "__main__":
    sys.exit(main())
