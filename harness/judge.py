"""LLM judges at an OpenAI-compatible chat/completions endpoint (a hosted model, a vLLM server).

    Judge(url, model).annotate(task, traj)               StepTool's step annotation (paper Sec. 4.1)
    Judge(url, model).means(task, traj)                  its means, or (None, the error): reward.py's judge
    FactsJudge(url, model)(task, traj) -> 1 | 0.5 | 0    eval.py's `facts` judge: answer facts, else the annotator
    judge_trajectories(trajs, tasks, judge_fn, repeats)  evaluate's judging: trajectories x repeats -> label entries
    PassRateJudge(url, model, stb_dir).judge(example, rng)  one repeat of the pass-rate decision (eval.py)
    judge_answers(items, judge, repeats, seed)           answers x repeats -> label entries, judge errors

The pass-rate decision, for one answer (a StableToolBench converted answer, formats.py) and one repeat,
as StableToolBench's evaluator (ReinforceToolLearningEvaluator) and ToolBench's eval_pass_rate.py take it:
  1. the final step is not a Finish call            -> Unsolved, failed; nothing is asked
  2. an empty final answer or give_up_and_restart   -> Unsolved; else ask check_answer_status(query,
     final answer)                                   -> Solved | Unsure | Unsolved
  3. Unsure                                          -> ask parse_answer_status(query, the whole answer as JSON)
  4. not Solved                                      -> ask check_task_solvable(query and offered tools)
                                                        -> Solvable | Unsolvable | Unsure
  5. Solved: passed; Unsolved + Solvable: failed; Unsolved or Unsure + Unsolvable: passed; any other
     pair: a coin flip, 50/50, seeded by (seed, group, query id, repeat) and recorded
  6. (eval.py) over the repeats a query passes if it failed no more often than it passed (ties pass)
Each question is one forced function call (`tools` + `tool_choice`) with a `reason` field, at
temperature 0. The prompts: with stb_dir, StableToolBench's own, read at run time from the user's
checkout (its evaluator folder: template.txt, <function><name>N</name><description>D</description>
</function> blocks with {query} / {answer} / {task} fields; config.yaml: the function schemas), so
that the numbers are comparable. Without, OUR_PROMPTS: the same three questions in our own words,
whose numbers eval.py marks "not comparable with StableToolBench".

Departures:
1. A judge that fails (connection error, HTTP status, timeout, a reply that is not the asked call or
   whose status is outside its enum) is retried with exponential backoff (`retries`, `backoff`), then
   raises JudgeError naming the endpoint; a failure is never a status. An answer with a failed repeat
   is a judge error as a whole (judge_answers): no label entry, its message kept, its other repeats
   not asked. StableToolBench retries too (tenacity, backoff) but then stops the whole run.
2. StableToolBench's eval_pass_rate.py records only steps 1-3 (is_solved per repeat) and scores them
   (Solved 1, Unsure 0.5): the solvable pass rate that the paper's Table 1 quotes. Steps 4-6 are
   ToolBench's earlier eval_pass_rate.py; eval.py reports them as the majority pass rate beside it.
3. Temperature 0 (--judge-temperature): StableToolBench's default evaluator config asks 0.2, so its
   repeats differ; ours differ only where the server is not deterministic, and by coin flips.
4. The `reason` field is described in our words (StableToolBench adds it in its code, not its template).
5. Sent: model, messages, tools, tool_choice, temperature; not StableToolBench's max_tokens (1000).
6. The step annotator's prompt (JUDGE_SYSTEM) is our wording of the paper's GPT-4 annotation procedure.
"""
import copy
import json
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from tqdm import tqdm

import eval as evaluation
import reward
from harness import formats

STB_EVALUATOR = os.path.join("toolbench", "tooleval", "evaluators", "tooleval_gpt-3.5-turbo_default")
NOT_COMPARABLE = "our prompts: not comparable with StableToolBench"


class JudgeError(RuntimeError):
    """A judge that failed every try: names the endpoint and the last error (never the key)."""


class Client:
    """POSTs to URL .../v1 or .../v1/chat/completions. The key is read from the environment variable
    `key_env` at each request (none: no Authorization header); it is never stored, printed or logged."""

    def __init__(self, url, model, key_env="OPENAI_API_KEY", timeout=60.0, retries=2, backoff=1.0):
        u = url.rstrip("/")
        u = u if u.endswith("/chat/completions") or u.endswith("/v1") else u + "/v1"
        self.url = u if u.endswith("/chat/completions") else u + "/chat/completions"
        self.model, self.key_env, self.timeout, self.retries, self.backoff = model, key_env, timeout, retries, backoff

    def ask(self, body, parse):
        """POST body (the model added) until parse(reply) returns; retries with backoff, then JudgeError."""
        key = os.environ.get(self.key_env, "").strip()
        headers, last = {"Authorization": f"Bearer {key}"} if key else {}, ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = requests.post(self.url, json={"model": self.model, **body}, headers=headers, timeout=self.timeout)
                if r.status_code != 200:
                    last = f"HTTP {r.status_code}"
                    continue
                return parse(r.json())
            except (requests.RequestException, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                text = str(e)
                for k in (key, repr(key)[1:-1]) if key else ():  # requests quotes a malformed header
                    text = text.replace(k, "<key>")
                last = f"{type(e).__name__}: {text[:200]}"
        raise JudgeError(f"judge at {self.url} failed {self.retries + 1} times; last: {last}")


def reply_object(reply, name=None):
    """A chat completion -> the JSON object it answers: the arguments of its tool call (the one named
    `name` if given), of a legacy function_call, or the first {...} in its text (code fences and words
    around it skipped). Raises ValueError / KeyError / TypeError / IndexError when there is none."""
    msg = reply["choices"][0]["message"]
    calls = [c["function"] for c in msg.get("tool_calls") or []] or ([msg["function_call"]] if msg.get("function_call") else [])
    if name and calls:
        calls = [c for c in calls if c.get("name") == name] or calls
    text = calls[0]["arguments"] if calls else msg.get("content") or ""
    obj = text if isinstance(text, dict) else json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
    if not isinstance(obj, dict):
        raise ValueError(f"judge reply is not a JSON object: {text[:100]!r}")
    return obj


# ---- the step annotator (reward.py, paper Sec. 4.1) ------------------------------------------
STEP_STATUS = ("solved", "unsure", "unsolved")
JUDGE_SYSTEM = (
    "You review how an AI assistant used tools (APIs) to answer a user's query. You get the query, each "
    "tool call with the response it got, and the assistant's final answer. For every tool call give\n"
    "- success: 1 if the call worked and returned usable data, 0 if it failed (an error, an empty or "
    "meaningless response, a wrong function or wrong arguments);\n"
    "- contribution: 0 (the final answer uses nothing from this call) to 5 (the final answer rests on it).\n"
    "Then grade the final answer: \"Solved\" if it answers the whole query with information from the tools, "
    "\"Unsolved\" if it does not or gives up, \"Unsure\" if you cannot tell.\n"
    "Reply with JSON only: {\"steps\": [{\"success\": 0 or 1, \"contribution\": 0 to 5}, ... one per tool "
    "call, in order], \"status\": \"Solved\" | \"Unsure\" | \"Unsolved\"}")


def judge_messages(task, traj, max_chars=1024):
    """The chat that asks the judge to annotate one episode (our wording of the paper's procedure)."""
    calls = [{"call": i + 1, "function": s.name or "(unparsed)", "arguments": s.arguments,
              "response": (json.dumps(s.record, ensure_ascii=False) if s.record else s.observation)[:max_chars]}
             for i, s in enumerate(reward.intermediate(traj))]
    answer = {"give_answer": traj.final_answer, "give_up": "(the assistant gave up)"}.get(traj.finish, "(none)")
    tools = ", ".join(f["name"] for f in task.functions) or "?"
    user = (f"Query: {task.query or traj.query}\nTools offered: {tools}\n"
            f"Tool calls ({len(calls)}):\n{json.dumps(calls, ensure_ascii=False, indent=1)}\nFinal answer: {answer}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_judge_reply(reply, n):
    """A chat completion -> ([success 0/1] * n, [contribution 0..5] * n, status). Raises ValueError /
    KeyError / TypeError / IndexError when the reply does not fit."""
    obj = reply_object(reply)
    status = str(obj["status"]).split(".")[-1].strip().lower()
    succ = [float(s["success"]) for s in obj["steps"]]
    contrib = [float(s["contribution"]) for s in obj["steps"]]
    if len(succ) != n or status not in STEP_STATUS or not all(s in (0, 1) for s in succ) or not all(0 <= c <= 5 for c in contrib):
        raise ValueError(f"judge reply does not fit {n} steps: {json.dumps(obj)[:200]}")
    return [int(s) for s in succ], contrib, status.capitalize()


class Judge(Client):
    """The step annotator: per intermediate call success 0/1 and contribution 0-5, then the answer's
    status, `repeats` requests per episode at the server's default temperature (so that they differ)."""

    def __init__(self, url, model, key_env="OPENAI_API_KEY", repeats=3, timeout=60.0, retries=2, backoff=1.0,
                 max_chars=1024):
        super().__init__(url, model, key_env, timeout, retries, backoff)
        self.repeats, self.max_chars = repeats, max_chars

    def annotate(self, task, traj):
        """One episode -> an annotation in the original's format (annotation_means); JudgeError."""
        n, body = len(reward.intermediate(traj)), {"messages": judge_messages(task, traj, self.max_chars)}
        reps = [self.ask(body, lambda r: parse_judge_reply(r, n)) for _ in range(self.repeats)]
        return {"process_reward": {str(i): {"succeed_tool_calling": s, "contributions": c}
                                   for i, (s, c, _) in enumerate(reps)},
                "is_solved": {str(i): f"AnswerStatus.{st}" for i, (_, _, st) in enumerate(reps)}}

    def means(self, task, traj):
        """What reward.py asks of a judge: -> (annotation_means of the episode's annotation, "") or (None,
        the error) when the judge failed every try; a failing judge never stops training (reward.py,
        departure 6)."""
        try:
            ann = self.annotate(task, traj)
        except JudgeError as e:
            return None, str(e)
        return annotation_means(ann), ""


IS_SOLVED = {"solved": 1.0, "unsure": 0.5, "unsolved": 0.0}  # AnswerStatus -> IsSolved


def annotation_means(ann):
    """An annotation in the original's format, {"process_reward": {repeat: {"succeed_tool_calling":
    [0/1 ..], "contributions": [0..5 ..]}}, "is_solved": {repeat: "AnswerStatus.Solved" ..}} ->
    (mean SuccCalling per step, mean contribution / 5 per step, mean IsSolved), over the repeats."""
    reps = list(ann["process_reward"].values())
    n = len(reps[0]["succeed_tool_calling"])
    succ = [sum(float(r["succeed_tool_calling"][i]) for r in reps) / len(reps) for i in range(n)]
    contrib = [sum(float(r["contributions"][i]) for r in reps) / (5 * len(reps)) for i in range(n)]
    status = [IS_SOLVED[str(s).split(".")[-1].lower()] for s in ann["is_solved"].values()]
    return succ, contrib, sum(status) / len(status)


class FactsJudge:
    """eval.py's `facts` judge_fn(task, traj) -> 1 | 0.5 | 0: a tool world's own verdict (world.passed), answer
    facts where a task has them (reward.is_solved); else the step annotator at url, asked once per repeat, whose
    failure raises JudgeError (a judge error, never 0.5). Without a url such tasks are Unsure (0.5), and a warning
    says so: such numbers are not a pass rate."""

    def __init__(self, url="", model="gpt-4o-mini", **kw):
        self.annotator, self.warned = (Judge(url, model, repeats=1, **kw) if url else None), False

    def __call__(self, task, traj):
        if task.world:   # a tool world scores as its benchmark does (BFCL: an entry passes or fails, no partial credit)
            return task.world.passed(task, traj)
        if task.answer or self.annotator is None or traj.finish != "give_answer" or not traj.final_answer.strip():
            if self.annotator is None and not task.answer and not self.warned:
                self.warned = True
                print("eval.py: warning: no --judge-url; tasks without answer facts are judged Unsure", file=sys.stderr)
            return reward.is_solved(task, traj)
        return annotation_means(self.annotator.annotate(task, traj))[2]

    def describe(self):
        a = self.annotator
        return {"kind": "facts", "url": a.url if a else "", "model": a.model if a else "", "prompts": "answer facts; "
                + (f"else reward.py's annotator, {NOT_COMPARABLE}" if a else "else Unsure (no judge): not a pass rate")}


def judge_trajectories(trajectories, tasks, judge_fn, repeats=3, workers=8):
    """evaluate's judging: judge_fn(task, traj) -> 1 | 0.5 | 0, `repeats` times per answer that ends
    in Finish give_answer (others Unsolved, unasked) -> (labels {group: {qid: label entry}}, errors
    {group: {qid: message}}); a judge_fn that raises JudgeError makes its query a judge error."""
    by_key = {(t.group, t.query_id): t for t in tasks}

    def one(traj):
        task = by_key.get((traj.group, traj.query_id))
        if task is None:
            raise KeyError(f"trajectory of query {traj.query_id} (group {traj.group}) has no task")
        try:
            scores = [judge_fn(task, traj) for _ in range(repeats)] if traj.finish == "give_answer" else [0] * repeats
        except JudgeError as e:
            return task, None, str(e)
        if any(s not in formats.STATUS_OF for s in scores):
            raise ValueError(f"judge_fn returned {scores} for query {traj.query_id}; expected 1, 0.5 or 0")
        return task, formats.to_label(task, traj, [formats.STATUS_OF[s] for s in scores]), ""
    labels, errors = {}, {}
    with ThreadPoolExecutor(workers) as pool:  # judges are often remote LLM calls
        for task, entry, err in tqdm(pool.map(one, trajectories), total=len(trajectories), desc="judge", leave=False):
            (errors if err else labels).setdefault(task.group, {})[str(task.query_id)] = err or entry
    return dict(sorted(labels.items())), errors


def labeller(judge_fn, workers=8):
    """judge_fn(task, traj) -> steptool.evaluate's judge: (trajectories, tasks, repeats) -> (labels, errors)."""
    return lambda trajectories, tasks, repeats: judge_trajectories(trajectories, tasks, judge_fn, repeats, workers)


def evaluate(trajectories, tasks, judge_fn, repeats=3, workers=8, errors=None):
    """Judge finished trajectories (judge_trajectories), then score them (eval.score_groups) -> (labels
    {group: {qid: entry}}, scored [(file, group, metrics)], groups). A judge_fn that raises JudgeError
    makes that query a judge error (eval.py, departure 6), its message put in `errors` {group: {qid: message}}."""
    labels, errs = judge_trajectories(trajectories, tasks, judge_fn, repeats, workers)
    if errors is not None:
        errors.update(errs)
    return labels, *evaluation.score_groups(labels, errs, tasks)


# ---- the pass-rate decision (eval.py; StableToolBench's evaluator) ----------------------------
ASKED = {  # question: (the fields its prompt is formatted with, the status it returns, that status's values)
    "check_answer_status": (("query", "answer"), "answer_status", ("Solved", "Unsure", "Unsolved")),
    "parse_answer_status": (("query", "answer"), "answer_status", ("Solved", "Unsure", "Unsolved")),
    "check_task_solvable": (("task",), "task_status", ("Solvable", "Unsolvable", "Unsure")),
}
OUR_PROMPTS = {
    "check_answer_status": "A user asked:\n{query}\n\nAn assistant that could call tools ended with this final answer:\n"
        "{answer}\n\nJudge the final answer alone. Unsolved: it apologises, refuses, gives up, or does not "
        "really reply to the request. Solved: it replies to every part of the request and you are confident "
        "that it settles it. Unsure: it replies, but the answer alone does not show whether it settles the "
        "request. Call check_answer_status with the status and a short reason.",
    "parse_answer_status": "A user asked:\n{query}\n\nHere is the assistant's whole attempt as JSON: each "
        "'tool' node holds a call (name, arguments) and the response it got; final_answer is what the user "
        "saw:\n{answer}\n\nJudge the final answer against the tool responses. Unsolved: every call failed, or "
        "the final answer states things the responses do not support. Solved: calls that succeeded provide "
        "what the final answer states, and it settles the request. Unsure: you still cannot verify it. Call "
        "parse_answer_status with the status and a short reason.",
    "check_task_solvable": "Here are a user's request and the tools offered for it, as JSON:\n{task}\n\n"
        "Could the request be settled with these tools? Unsolvable: the request carries invalid details (a "
        "malformed address, a number that cannot exist) or lacks details it needs. Solvable: the tools are "
        "enough. Unsure: you cannot tell. Call check_task_solvable with the status and a short reason.",
}
OUR_FUNCTIONS = {name: {"name": name, "description": f"Give the {key} you decided on.", "parameters": {
    "type": "object", "properties": {key: {"type": "string", "enum": list(values)}}, "required": [key]}}
    for name, (_, key, values) in ASKED.items()}
REASON = {"type": "string", "description": "Why: one or two sentences."}
PASS = {**{("Solved", t): "passed" for t in ("Solvable", "Unsolvable", "Unsure")},  # step 5; other pairs: a coin
        ("Unsolved", "Solvable"): "failed", ("Unsolved", "Unsolvable"): "passed", ("Unsure", "Unsolvable"): "passed"}


def load_prompts(stb_dir):
    """StableToolBench's pass-rate prompts and function schemas, read from the user's checkout (or its
    evaluator folder) -> (prompts {name: text}, functions {name: schema}, the folder). ValueError naming
    the file when they are not there or do not fit the three questions."""
    folder = next((d for d in (stb_dir, os.path.join(stb_dir, STB_EVALUATOR))
                   if os.path.isfile(os.path.join(d, "template.txt"))), None)
    if folder is None:
        raise ValueError(f"--stb-dir {stb_dir}: no template.txt there or in {STB_EVALUATOR}; give a "
                         "StableToolBench checkout or its evaluator folder")
    path = os.path.join(folder, "template.txt")
    with open(path, encoding="utf-8") as f:
        blocks = re.findall(r"<function>(.*?)</function>", f.read(), re.S)
    prompts = {}
    for b in blocks:
        name, text = re.search(r"<name>(.*?)</name>", b, re.S), re.search(r"<description>(.*?)</description>", b, re.S)
        if name and text:
            prompts[name.group(1).strip()] = text.group(1)
    import yaml  # a dependency of transformers
    try:
        with open(os.path.join(folder, "config.yaml"), encoding="utf-8") as f:
            functions = {fn["name"]: fn for fn in yaml.safe_load(f)["completions_kwargs"]["functions"]}
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        raise ValueError(f"--stb-dir: cannot read the function schemas in {folder}/config.yaml: {e}") from None
    for name, (fields, _, _) in ASKED.items():
        if name not in prompts or name not in functions:
            raise ValueError(f"--stb-dir: {path} or its config.yaml has no function {name}")
        try:
            prompts[name].format(**{k: "" for k in fields})
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"--stb-dir: {path}: {name}'s text does not format with {fields}: {e!r}") from None
    return prompts, functions, folder


class PassRateJudge(Client):
    """Steps 1-5 for one answer and one repeat (judge); the prompts are StableToolBench's (stb_dir) or ours."""

    def __init__(self, url, model, stb_dir="", temperature=0.0, **kw):
        super().__init__(url, model, **kw)
        self.temperature = temperature
        self.prompts, self.functions, self.source = load_prompts(stb_dir) if stb_dir else (OUR_PROMPTS, OUR_FUNCTIONS, "")
        self.comparable = bool(stb_dir)

    def describe(self):
        """What results.json records about the judge (never the key)."""
        return {"kind": "stabletoolbench", "url": self.url, "model": self.model, "temperature": self.temperature,
                "prompts": self.source or NOT_COMPARABLE, "comparable_with_stabletoolbench": self.comparable,
                "retries": self.retries, "timeout_s": self.timeout}

    def call(self, name, **fields):
        """Ask one question as a forced function call -> (status, reason); JudgeError after the retries."""
        _, key, values = ASKED[name]
        fn = copy.deepcopy(self.functions[name])
        params = fn.setdefault("parameters", {"type": "object", "properties": {}})
        params.setdefault("properties", {})["reason"] = REASON
        params["required"] = [*params.get("required", []), "reason"]
        body = {"messages": [{"role": "user", "content": self.prompts[name].format(**fields)}],
                "tools": [{"type": "function", "function": fn}],
                "tool_choice": {"type": "function", "function": {"name": name}}, "temperature": self.temperature}

        def parse(reply):
            obj = reply_object(reply, name)
            status = str(obj[key]).strip()
            if status not in values:
                raise ValueError(f"{name} answered {key} {status[:40]!r}, not one of {', '.join(values)}")
            return status, str(obj.get("reason", ""))
        return self.ask(body, parse)

    def judge(self, example, rng):
        """One repeat -> {status "AnswerStatus.X", reason, task_status, pass_label, coin}."""
        answer, query = example["answer"], example["query"]
        if "'name': 'Finish'" not in formats.answer_steps(example)[1]:                 # 1.
            return {"status": "AnswerStatus.Unsolved", "reason": "no Finish call", "pass_label": "failed"}
        final = answer["final_answer"]
        if final == "" or "give_up_and_restart" in final:                                # 2.
            status, why = "Unsolved", "empty final answer"
        else:
            status, why = self.call("check_answer_status", query=query, answer=final)
            if status == "Unsure":                                                       # 3.
                status, why = self.call("parse_answer_status", query=query, answer=json.dumps(answer))
        task, task_why = "Solvable", ""
        if status != "Solved":                                                           # 4.
            task, task_why = self.call("check_task_solvable",
                                       task=json.dumps({"query": query, "available_tools": example["available_tools"]}))
        label, coin = PASS.get((status, task)), ""
        if label is None:                                                                # 5. a coin flip
            label = coin = "passed" if rng.random() < 0.5 else "failed"
        return {"status": f"AnswerStatus.{status}", "reason": f"Is solved: {why}" + (f"\nTask solvable: {task_why}"
                if task_why else ""), "task_status": f"TaskStatus.{task}", "pass_label": label, "coin": coin}


def judge_answers(items, judge, repeats=3, seed=0, workers=8):
    """[(group, query id, converted answer)] -> (labels {group: {qid: entry}}, errors {group: {qid: message}}).
    Each answer is judged `repeats` times, repeat r with the coin random.Random("seed:group:qid:r"); an
    answer whose judge fails at any repeat is a judge error (departure 1)."""
    def one(item):
        g, qid, example = item
        try:
            judged = [judge.judge(example, random.Random(f"{seed}:{g}:{qid}:{r}")) for r in range(repeats)]
            return g, str(qid), formats.label_entry(example, [j["status"] for j in judged], judged), ""
        except JudgeError as e:
            return g, str(qid), None, str(e)
    labels, errors = {}, {}
    with ThreadPoolExecutor(workers) as pool:  # each request waits on the network
        for g, qid, entry, err in tqdm(pool.map(one, items), total=len(items), desc="judge", leave=False):
            (errors if err else labels).setdefault(g, {})[qid] = err or entry
    return labels, errors
