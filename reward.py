"""Step-grained reward shaping of StepTool (paper Sec. 4.1): SuccCalling, Contribution and IsSolved.

An episode a_1 .. a_T (env.Trajectory; a_T calls Finish) gets one reward per step (Sec. 4.1):

    r_t = (alpha * SuccCalling_t + Contribution_t) / (1 + alpha)    t < T, each intermediate call
    r_T = IsSolved(q, a_T):  1 Solved, 0.5 Unsure, 0 Unsolved       t = T, the Finish step

SuccCalling_t   0/1: the call parsed, named an offered function and its record is no failure (rules)
Contribution_t  how much of the step's tool response the final answer uses: LCS / response length,
                1 if >= 0.3 else 0 (the original's rule), or that ratio itself (threshold=None)
IsSolved        embedded tasks: their answer facts; StableToolBench tasks: an LLM judge annotating the episode
                as the paper's GPT-4 did (per step success 0/1, contribution 0-5, then a status), averaged
Modes: `stepgrained`, `final` (0 for each call, then IsSolved: the paper's "PPO (final reward)"
baseline and its "without step reward" ablation), or "module.function": fn(task, traj) -> [r_t].

A judge (harness.judge.Judge, an OpenAI-compatible endpoint) gives means(task, traj) -> ((mean SuccCalling_t,
mean Contribution_t / 5, mean IsSolved) over its repeats, "") or (None, why it failed). Annotating files
and the original's TSV: `python -m harness.annotate` (docs/stabletoolbench.md).

Departures from the paper and the original code:
1. r_t is divided by (1 + alpha), which keeps it in [0, 1] as in the original's released training
   data (its rewards are (mean success + mean contribution / 5) / 2); the paper has no divisor.
2. The LCS is exact but bit-parallel (len(b) steps of len(a)-bit integer operations) instead of the original
   notebook's O(n*m) table (harness.annotate's bench times both), and reads the first 1,024 characters of
   the response (env.ToolEnv shows the model 1,024 characters of a record).
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
Left out: the original's GPT-4 prompt (ours is our own wording) and DFSDT search trees (one path per
episode); its per-query annotation JSON is no input of `annotate` (harness.annotate.annotation_rewards reads one).
"""
import ast
import importlib
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor


# ---- SuccCalling ----------------------------------------------------------------------------
SHORT = 300  # characters: a longer text response is data, whatever words it contains
_ERROR_WORDS = re.compile(r"\b(errors?|invalid|not found|no such|unknown|missing|wrong|is empty|must be|failed|"
                          r"does ?n[o']t exist|unauthori[sz]ed|forbidden|not subscribed|disabled|blocked|"
                          r"too many requests|rate limit|exceeded|timed? ?out|expired|bad request)\b", re.I)
_PLEASE = re.compile(r"(^|[.!?]\s+)please\b", re.I)  # "Please check what you are inputting"
_ENVELOPE = {"message", "msg", "detail", "error", "errors", "status", "statuscode", "status_code", "code", "success"}


def literal(s):
    """JSON or Python-literal text -> its value (data only, never run), or None."""
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        try:
            return ast.literal_eval(s) if len(s) < 20000 else None
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None


def failed_response(resp):
    """True when a tool response reads as a failure (the rules are listed in succ_calling)."""
    if isinstance(resp, str):
        s = resp.strip()
        parsed = literal(s) if s[:1] in ("{", "[") else None
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
    V = mask = (1 << len(a)) - 1
    for ch in b:
        U = V & match.get(ch, 0)
        if U:
            V = ((V + U) | (V - U)) & mask
    return len(a) - V.bit_count()


def lcs_table(a, b):
    """The same length by the original notebook's O(len(a) * len(b)) table: the reference in tests, and
    the cost that harness.annotate's bench compares lcs_length with."""
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
def is_solved(task, traj, judge=None, judged=None):
    """IsSolved(q, a_T) (Sec. 4.1): 1 Solved, 0.5 Unsure, 0 Unsolved. No Finish, a give-up or an empty
    answer -> 0. With answer facts (the embedded benchmark): all facts in the answer (`mentions`) -> 1,
    some -> 0.5, none -> 0. Without: the judge's mean status `judged[2]` (asked here if given), or 0.5 (departure 5)."""
    if task.world:                                                  # a tool world's own check (harness/bfcl.py)
        return task.world.is_solved(task, traj)
    if traj.finish != "give_answer" or not traj.final_answer.strip():
        return 0.0
    if task.answer:
        found = sum(mentions(traj.final_answer, a) for a in task.answer)
        return 1.0 if found == len(task.answer) else 0.5 if found else 0.0
    if judged is None and judge is not None:
        judged = judge.means(task, traj)[0]
    return judged[2] if judged else 0.5


def mentions(text, fact):
    """Is `fact` in `text`, case-insensitive, as a whole token: "2" is in "platform: 2" but not in "TR582",
    "12", "2.5" or "1.2"; "on time" is in "It is on time."."""
    f = re.escape(str(fact).strip().lower())
    return re.search(rf"(?<![0-9a-z])(?<![0-9]\.){f}(?![0-9a-z])(?!\.[0-9])", text.lower()) is not None


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
        if not all(abs(x) <= sys.float_info.max for x in r):  # each r is a float: no inf, no nan
            raise ValueError(f"reward function {mode.__name__}: a reward is not finite: {r[:8]}")
        return r, {"judged": 0, "error": ""}
    mid = intermediate(traj)
    use_judge = judge is not None and (mode == "stepgrained" or (not task.answer and traj.finish == "give_answer"))
    judged, err = judge.means(task, traj) if use_judge else (None, "")  # a failed judge: (None, why), departure 6
    if judged:
        succ, contrib, _ = judged
    else:
        offered = None if task.world else {f["name"] for f in task.functions} or None
        succ = [succ_calling(s, offered) for s in mid]
        if task.world:   # a tool world's own Contribution (harness/bfcl.py: a turn's ground-truth calls)
            contrib = [task.world.contribution(s) for s in mid]
        else:
            contrib = [_contribution(s, traj.final_answer, threshold, obs_chars) if ok else 0.0 for s, ok in zip(mid, succ)]
    solved = is_solved(task, traj, judged=judged)
    r = [0.0] * len(mid) if mode == "final" else shaped(succ, contrib, alpha)  # final: PPO (final reward)
    if traj.finish:
        r.append(solved)      # Sec. 4.1, r_T = IsSolved
    elif r:
        r[-1] += solved       # = 0: no Finish (departure 4)
    return r, {"succ": succ, "contrib": contrib, "solved": solved, "judged": int(bool(judged)), "error": err}


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
