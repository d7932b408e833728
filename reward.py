"""Step-grained reward shaping of StepTool (paper Sec. 4.1): SuccCalling, Contribution and IsSolved.

An episode a_1 .. a_T (env.Trajectory; a_T calls Finish) gets one reward per step (Sec. 4.1):

    r_t = (alpha * SuccCalling_t + Contribution_t) / (1 + alpha)    t < T, each intermediate call
    r_T = IsSolved(q, a_T):  1 Solved, 0.5 Unsure, 0 Unsolved       t = T, the Finish step

SuccCalling_t   0/1: the call parsed, named an offered function and its record is no failure (rules)
Contribution_t  how much of the step's tool response the final answer uses: LCS / response length,
                1 if >= 0.3 else 0 (the original's rule), or that ratio itself (threshold=None)
IsSolved        embedded tasks: their answer facts; StableToolBench tasks: an LLM judge (`Judge`) that
                annotates the episode as the paper's GPT-4 did (per step success 0/1 and contribution
                0-5, then Solved/Unsure/Unsolved), `repeats` times, averaged
Modes: `stepgrained`, `final` (0 for each call, then IsSolved: the paper's "PPO (final reward)"
baseline and its "without step reward" ablation), or "module.function": fn(task, traj) -> [r_t].

    python reward.py annotate --in trajs.jsonl --out annotated.jsonl [--judge-url URL --judge-model M]
    python reward.py convert --in step_grained_for_ppo.tsv --out trajs.jsonl   # and .jsonl -> .tsv
    python reward.py bench        # time the shaping of 1,000 embedded-benchmark episodes

Files (formats.py): `annotate` and `convert` read our trajectory JSONL or the original's training TSV,
checked whole before any work; a bad line is a DataFileError, "PATH:LINE: what is wrong", which the
command line prints as one line with exit status 2, as it does a flag out of range (Config). The LLM
judge (judge.Judge) asks an OpenAI-compatible endpoint.

Departures from the paper and the original code:
1. r_t is divided by (1 + alpha), which keeps it in [0, 1] as in the original's released training
   data (its rewards are (mean success + mean contribution / 5) / 2); the paper has no divisor.
2. The LCS is exact but bit-parallel (len(b) steps of len(a)-bit integer operations) instead of the
   original notebook's O(n*m) table (`bench` times both), and reads the first 1,024 characters of the
   response (env.ToolEnv shows the model 1,024 characters of a record).
3. The original's check_success said "success" for any record with an empty error (its later checks
   were unreachable); our rules also read the response (succ_calling).
4. An episode that never called Finish has no a_T: each step is an intermediate call, and the final
   reward, IsSolved = 0, is added to the last step (in `final` mode the episode is all zeros).
5. A task without answer facts, with no judge (or a failed one), counts a non-empty answer as Unsure
   (0.5): no rule grades free text. Answer facts decide IsSolved even when a judge is given; the judge
   then scores the intermediate steps only.
6. A judge that fails (HTTP error, timeout, unparseable reply) after retries with backoff falls back
   to the rules for that episode (IsSolved as in 5), and shape_batch counts it (judge_fallbacks;
   steptool.py logs it as reward/judge_errors): training never stops on a judge, nor hides one.
Left out: the original's GPT-4 prompt (ours is our own wording), DFSDT search trees (one path per
episode), and the original's per-query annotation JSON as an input of `annotate` (annotation_rewards
turns one entry of it into rewards).
"""
import argparse
import importlib
import json
import math
import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import env
from harness.formats import TASK_FILES, finite, load_task_index, read_trajectories, convert
from harness.formats import literal as _literal
# moved to formats.py and judge.py; these names stay importable from here for their old callers
from harness.formats import DataFileError, read_tsv, write_tsv, read_jsonl, tsv_row_to_traj, traj_to_tsv_row  # noqa: F401
from harness.judge import Judge, JudgeError, judge_messages, parse_judge_reply  # noqa: F401

STATUS = {"solved": 1.0, "unsure": 0.5, "unsolved": 0.0}  # AnswerStatus -> IsSolved


# ---- SuccCalling ----------------------------------------------------------------------------
SHORT = 300  # characters: a longer text response is data, whatever words it contains
_ERROR_WORDS = re.compile(r"\b(errors?|invalid|not found|no such|unknown|missing|wrong|is empty|must be|failed|"
                          r"does ?n[o']t exist|unauthori[sz]ed|forbidden|not subscribed|disabled|blocked|"
                          r"too many requests|rate limit|exceeded|timed? ?out|expired|bad request)\b", re.I)
_PLEASE = re.compile(r"(^|[.!?]\s+)please\b", re.I)  # "Please check what you are inputting"
_ENVELOPE = {"message", "msg", "detail", "error", "errors", "status", "statuscode", "status_code", "code", "success"}


def failed_response(resp):
    """True when a tool response reads as a failure (the rules are listed in succ_calling)."""
    if isinstance(resp, str):
        s = resp.strip()
        parsed = _literal(s) if s[:1] in ("{", "[") else None
        if parsed is not None:
            return failed_response(parsed)
        return not s or (len(s) <= SHORT and bool(_ERROR_WORDS.search(s) or _PLEASE.search(s)))
    if resp is None or (isinstance(resp, (dict, list)) and not resp):
        return True
    if not isinstance(resp, dict):
        return False
    low = {str(k).lower(): v for k, v in resp.items()}
    for k in ("status", "statuscode", "status_code", "code"):
        v = low.get(k)
        v = int(v) if isinstance(v, str) and v.strip().isdigit() else v
        if (type(v) is int and 400 <= v < 600) or (isinstance(v, str) and v.lower() in ("error", "fail", "failed")):
            return True
    if low.get("success") is False or low.get("error") or low.get("errors"):
        return True
    text = " ".join(str(v) for v in low.values())
    return set(low) <= _ENVELOPE and bool(_ERROR_WORDS.search(text) or _PLEASE.search(text))


def succ_calling(step, offered=None):
    """SuccCalling_t in {0, 1} by rules (Sec. 4.1). 0 when:
    a. the turn did not parse, named an unknown function or made no call (step.error, no record);
       a Finish step is no call;
    b. `offered` (a set of function names) is given and lacks the function;
    c. the server's record has a non-empty `error` (protocol errors: parse error, API not found);
    d. the response is a failure: empty (None, "", {}, []); a top-level status / statusCode /
       status_code / code of 400-599 or "error"/"fail"; `success: false`; a non-empty top-level
       error / errors; or error wording (error, invalid, not found, missing, must be, not subscribed,
       rate limit, ...) or a "Please ..." instruction in a short text (<= 300 characters) or in a dict
       of message fields only (message, msg, detail, error, status, code, success).
    A response that is JSON or Python-literal text ("{'statusCode': 404, ...}") is read as its value."""
    if step.error or not isinstance(step.record, dict) or step.name == "Finish":
        return 0
    if offered is not None and step.name not in offered:
        return 0
    if str(step.record.get("error") or "").strip():
        return 0
    return 0 if failed_response(step.record.get("response")) else 1


# ---- Contribution ---------------------------------------------------------------------------
def lcs_length(a, b):
    """Length of the longest common subsequence of strings a and b, exact, in len(b) steps of a few
    len(a)-bit integer operations (bit-parallel LCS: Allison & Dix 1986, Hyyro 2004). Bit i of V is 1
    while a[i] is unmatched; the LCS length is the number of 0 bits at the end."""
    match = {}
    for i, ch in enumerate(a):
        match[ch] = match.get(ch, 0) | (1 << i)  # where ch occurs in a, as bits
    mask = (1 << len(a)) - 1
    V = mask
    for ch in b:
        U = V & match.get(ch, 0)
        if U:
            V = ((V + U) | (V - U)) & mask
    return len(a) - V.bit_count()


def lcs_table(a, b):
    """The same length by the original notebook's O(len(a) * len(b)) table: the reference in tests, and
    the cost that `bench` compares lcs_length with."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def contribution(step, final_answer, threshold=0.3, max_chars=1024):
    """Contribution_t (Sec. 4.1) by the original's rule: LCS(response, final answer) / len(response),
    response = str() of the record's response, cut to `max_chars`; 1 if >= threshold else 0, or the
    ratio itself when threshold is None. A failed call or an empty response contributes 0."""
    return _contribution(step, final_answer, threshold, max_chars) if succ_calling(step) else 0.0


def _contribution(step, final_answer, threshold, max_chars=1024):  # for a call that succeeded
    resp = step.record.get("response")
    text = (resp if isinstance(resp, str) else str(resp))[:max_chars]
    if not text or not final_answer:
        return 0.0
    ratio = lcs_length(text, final_answer) / len(text)
    return ratio if threshold is None else float(ratio >= threshold)


# ---- IsSolved -------------------------------------------------------------------------------
def is_solved(task, traj, judge=None, ann=None):
    """IsSolved(q, a_T) (Sec. 4.1): 1 Solved, 0.5 Unsure, 0 Unsolved. No Finish, a give-up or an empty
    answer -> 0. With answer facts (the embedded benchmark): all facts in the answer (case-insensitive)
    -> 1, some -> 0.5, none -> 0. Without: the mean status of the judge's annotation `ann` (made here if
    a judge is given), or 0.5 (departure 5)."""
    if traj.finish != "give_answer" or not traj.final_answer.strip():
        return 0.0
    if task.answer:
        answer = traj.final_answer.lower()
        found = sum(a.lower() in answer for a in task.answer)
        return 1.0 if found == len(task.answer) else 0.5 if found else 0.0
    if ann is None and judge is not None:
        ann = _annotate(judge, task, traj)[0]
    return annotation_means(ann)[2] if ann else 0.5


# ---- step rewards ---------------------------------------------------------------------------
def intermediate(traj):
    """The intermediate calls a_1 .. a_{T-1}: every step but a final Finish (all steps if none)."""
    return traj.steps[:-1] if traj.finish else traj.steps


def shaped(succ, contrib, alpha=1.0):
    return [(alpha * s + c) / (1 + alpha) for s, c in zip(succ, contrib)]  # Sec. 4.1, r_t (departure 1)


def step_rewards(task, traj, mode="stepgrained", alpha=1.0, judge=None, contribution_threshold=0.3, obs_chars=1024):
    """[r_1 .. r_T], one per step of traj; the last one carries IsSolved (departure 4 if unfinished).
    obs_chars: Contribution reads each response as the policy saw it, cut to the run's --obs-chars."""
    return _shape(task, traj, _mode(mode), alpha, judge, contribution_threshold, obs_chars)[0]


def _mode(mode):
    if callable(mode) or mode in ("stepgrained", "final"):
        return mode
    module, _, name = str(mode).rpartition(".")
    if not module:
        raise ValueError(f"unknown reward mode {mode!r}: stepgrained, final, or module.function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward mode {mode!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward mode {mode!r}: not a function")
    return fn


def _shape(task, traj, mode, alpha, judge, threshold, obs_chars=1024):
    """-> (rewards, info): info holds the parts (succ, contrib, solved) and the judge's flags."""
    if callable(mode):
        r = [float(x) for x in mode(task, traj)]
        if len(r) != len(traj.steps):
            raise ValueError(f"reward function {mode.__name__}: {len(r)} rewards for {len(traj.steps)} steps")
        if not all(map(finite, r)):
            raise ValueError(f"reward function {mode.__name__}: a reward is not finite: {r[:8]}")
        return r, {"judged": 0, "error": ""}
    mid = intermediate(traj)
    use_judge = judge is not None and (mode == "stepgrained" or (not task.answer and traj.finish == "give_answer"))
    ann, err = _annotate(judge, task, traj) if use_judge else (None, "")
    if ann:
        succ, contrib, _ = annotation_means(ann)
    else:
        offered = {f["name"] for f in task.functions} or None
        succ = [succ_calling(s, offered) for s in mid]
        contrib = [_contribution(s, traj.final_answer, threshold, obs_chars) if ok else 0.0 for s, ok in zip(mid, succ)]
    solved = is_solved(task, traj, ann=ann)
    r = [0.0] * len(mid) if mode == "final" else shaped(succ, contrib, alpha)  # final: PPO (final reward)
    if traj.finish:
        r.append(solved)      # Sec. 4.1, r_T = IsSolved
    elif r:
        r[-1] += solved       # = 0: no Finish (departure 4)
    return r, {"succ": succ, "contrib": contrib, "solved": solved, "judged": int(bool(ann)), "error": err}


def shape_batch(tasks, trajs, mode="stepgrained", alpha=1.0, judge=None, contribution_threshold=0.3, workers=8,
                obs_chars=1024):
    """step_rewards of many episodes (each PPO iteration) -> (rewards, stats). stats: episodes, steps,
    reward (mean over steps), succ_calling and contribution (means over intermediate calls), is_solved
    (mean over episodes) and solved_each (IsSolved of each episode), judged and judge_fallbacks
    (episodes), seconds."""
    t0, fn = time.perf_counter(), _mode(mode)
    shape = lambda pair: _shape(pair[0], pair[1], fn, alpha, judge, contribution_threshold, obs_chars)
    if judge is None:
        out = [shape(p) for p in zip(tasks, trajs)]
    else:  # judge requests wait on the network: send several at once
        with ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(shape, zip(tasks, trajs)))
    rewards, infos = [r for r, _ in out], [i for _, i in out]
    errors = [i["error"] for i in infos if i["error"]]
    if errors:  # reported, not raised: these episodes got the rules (departure 6)
        print(f"reward: the judge failed on {len(errors)} of {len(infos)} episodes; rules used. Last: {errors[-1]}",
              file=sys.stderr)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    flat = [x for r in rewards for x in r]
    return rewards, {"episodes": len(rewards), "steps": len(flat), "reward": mean(flat),
                     "succ_calling": mean([s for i in infos for s in i.get("succ", [])]),
                     "contribution": mean([c for i in infos for c in i.get("contrib", [])]),
                     "is_solved": mean([i["solved"] for i in infos if "solved" in i]),
                     "solved_each": [i.get("solved", 0.0) for i in infos],
                     "judged": sum(i["judged"] for i in infos), "judge_fallbacks": len(errors),
                     "seconds": time.perf_counter() - t0}


def annotation_means(ann):
    """An annotation in the original's format, {"process_reward": {repeat: {"succeed_tool_calling":
    [0/1 ..], "contributions": [0..5 ..]}}, "is_solved": {repeat: "AnswerStatus.Solved" ..}} ->
    (mean SuccCalling per step, mean contribution / 5 per step, mean IsSolved), over the repeats."""
    reps = list(ann["process_reward"].values())
    n = len(reps[0]["succeed_tool_calling"])
    succ = [sum(float(r["succeed_tool_calling"][i]) for r in reps) / len(reps) for i in range(n)]
    contrib = [sum(float(r["contributions"][i]) for r in reps) / (5 * len(reps)) for i in range(n)]
    status = [STATUS[str(s).split(".")[-1].lower()] for s in ann["is_solved"].values()]
    return succ, contrib, sum(status) / len(status)


def annotation_rewards(ann, alpha=1.0):
    """The training rewards of an annotated episode: shaped r_1 .. r_{T-1}, then r_T = IsSolved."""
    succ, contrib, solved = annotation_means(ann)
    return shaped(succ, contrib, alpha) + [solved]


# ---- the LLM judge (judge.py) ----------------------------------------------------------------
def _annotate(judge, task, traj):
    """-> (annotation, "") or (None, the error): a failing judge never stops training (departure 6)."""
    try:
        return judge.annotate(task, traj), ""
    except JudgeError as e:
        return None, str(e)


# ---- annotate: shape recorded trajectories ---------------------------------------------------
def annotate(src, dst, task_files=TASK_FILES, judge=None, **kw):
    """Shape the step rewards of recorded trajectories: JSONL -> the same rows with `rewards`; -> stats.
    A trajectory's task (answer facts, offered functions) is found by query_id and query. Every line
    is read and checked (read_trajectories) before the first is shaped."""
    items, tasks = read_trajectories(src), load_task_index(task_files)
    trajs = [t for _, _, t in items]
    ts = [tasks[t.query_id] if t.query_id in tasks and tasks[t.query_id].query == t.query
          else env.Task(t.query_id, t.query, [], [], t.group, {}) for t in trajs]
    rewards, stats = shape_batch(ts, trajs, judge=judge, **kw)
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({**d, "rewards": r}, ensure_ascii=False) + "\n" for (_, d, _), r in zip(items, rewards))
    return stats


# ---- bench: what shaping costs ---------------------------------------------------------------
def bench(n=1000, runs=3, seed=0):
    """Time shape_batch on n embedded-benchmark episodes (expert replays, 60% perturbed), and the LCS of
    a 1,024 x 2,000-character pair: the original notebook's O(n*m) table against lcs_length."""
    import random
    from harness import server
    rng, tasks, srv, episodes = random.Random(seed), env.load_tasks(TASK_FILES[0]), server.start_in_thread(), []
    kinds = ["expert"] * 4 + ["bad argument", "unknown function", "unparseable", "fact dropped", "gives up",
                              "no Finish"]
    try:
        client = env.ToolClient(srv.url)
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
    runs_out = [shape_batch([t for t, _, _ in episodes], [j for _, j, _ in episodes]) for _ in range(runs)]
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
    for name, fn in (("O(n*m) table", lcs_table), ("bit-parallel lcs_length", lcs_length)):
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


def opt(default, help, ok=None, need=""):
    """A Config field: its default, its --help text, and the range its value must lie in (ok, in words)."""
    return field(default=default, metadata={"help": help, "ok": ok, "need": need})


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
        _mode(c.mode)
    except ValueError as e:
        return f"--mode: {e}"
    return ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
        ap.exit(2, f"reward.py {a.command}: error: {msg}\n")
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
    except (ValueError, OSError) as e:  # DataFileError, env.TaskFileError, an unwritable --out
        fail(e)


if __name__ == "__main__":
    main()
