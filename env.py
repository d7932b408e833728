"""The tool-use decision process of StepTool (paper Sec. 3): tasks, prompt, actions, tool client.

    state s_t   the dialogue so far: system prompt (the offered functions + Finish), user query,
                earlier assistant turns and tool observations             -> ToolEnv.messages
    action a_t  one assistant turn in ReAct form                         -> parse_action
                    Thought: ...\\nAction: <function>\\nAction Input: <JSON>
                the last action calls Finish with give_answer / give_up_and_restart
    transition  the tool server's answer {"error": ..., "response": ...} -> ToolClient, ToolEnv.step

A finished episode is a `Trajectory`; reward.py scores its steps and eval.py its answer.

    python env.py --tasks data/bench_test.json --show 1    # render one task's prompt

Departures from ToolBench / the original code:
1. The system prompt is short: one line per function (name, parameters, description) instead of
   ToolBench's ~1,000-character instruction and full JSON schemas, so a small model's episodes
   stay short. Function names follow ToolBench's convention exactly (`function_name`), and so do
   the parameter names and types of StableToolBench APIs (`change_name(standardize(name))`).
2. An action that cannot be parsed, or names a function that is not offered, becomes an error
   observation and the episode goes on (ToolBench does the same for unknown names).
3. ToolBench's `standardize` keeps the character '^' (a quirk of its regex); we keep it too so
   that names match the real server's.
"""
import argparse
import ast
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import requests

FINISH = {"name": "Finish", "description": "End: return_type give_answer with final_answer, or give_up_and_restart.",
          "parameters": {"type": "object", "properties": {"return_type": {"type": "string"},
                         "final_answer": {"type": "string"}}, "required": ["return_type"]}}


# ---- ToolBench's function names -------------------------------------------------------------
def standardize(name):
    """ToolBench's standardize(): non-word characters -> '_', runs collapsed, lower-cased."""
    s = re.sub(r"[^\u4e00-\u9fa5^a-zA-Z0-9_]", "_", str(name))
    s = re.sub(r"_+", "_", s).lower().strip("_")
    return "get_" + s if s[:1].isdigit() else s


RESERVED = ("from", "class", "return", "false", "true", "id", "and")  # ToolBench's change_name() list


def change_name(name):
    """ToolBench's change_name(): a reserved word gets the prefix `is_` (API and parameter names)."""
    return "is_" + name if name in RESERVED else name


def function_name(tool, api):
    """ToolBench's model-facing name of an API: `<api>_for_<tool>`, reserved words prefixed, last 64 chars."""
    return f"{change_name(standardize(api))}_for_{standardize(tool)}"[-64:]


# ---- tasks ----------------------------------------------------------------------------------
@dataclass
class Task:
    query_id: int
    query: str
    functions: list  # OpenAI-style schemas {name, description, parameters}, Finish not included
    relevant: list   # function names of the relevant APIs (Recall's ground truth)
    group: str       # G1 / G2 / G3, or a StableToolBench group such as G1_instruction
    api: dict        # function name -> [category, tool_name, api_name] for the tool server
    answer: list = field(default_factory=list)  # facts the final answer must contain (embedded tasks)
    expert: list = field(default_factory=list)  # [{thought, name, arguments}], last one Finish


class TaskFileError(ValueError):
    """A task file we cannot use, as one line: "PATH: item I (query_id Q): what is wrong"."""


def load_tasks(path):
    """StableToolBench query files (a JSON list) or the embedded benchmark's files -> [Task]. The file is
    read whole by formats.read_json (a regular file, its size, nesting, no key twice) and every item is
    checked before any is used: each field of its type, the group a plain name (eval.py writes the file
    <group>.json), the query_id an integer, and no query_id twice in one group (one would go unscored)."""
    from harness import formats  # here, not at the top: formats imports env
    data = formats.read_json(path, "task file", TaskFileError)
    group = os.path.splitext(os.path.basename(path))[0]
    if isinstance(data, dict) and "tasks" in data:
        if not (isinstance(data["tasks"], list) and isinstance(data.get("functions", {}), dict)):
            raise TaskFileError(f"{path}: 'tasks' must be a list and 'functions' an object (name -> schema)")
        items, make = data["tasks"], lambda d: _bench_task(d, data.get("functions", {}))
    elif isinstance(data, list):
        items, make = data, lambda d: _stb_task(d, group)
    else:
        raise TaskFileError(f"{path}: expected a JSON list of queries or a benchmark object with 'tasks'")
    tasks, seen = [], {}
    for i, item in enumerate(items):
        qid = item.get("query_id", "?") if isinstance(item, dict) else "?"
        where = f"{path}: item {i} (query_id {qid if type(qid) is int else repr(qid)[:40]})"
        try:
            t = make(item)
            formats.plain_name(t.group, "group", ValueError)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TaskFileError(f"{where}: {e if type(e) is ValueError else f'{type(e).__name__}: {e}'}") from None
        if seen.setdefault((t.group, t.query_id), i) != i:
            raise TaskFileError(f"{where}: query_id {t.query_id} is already item {seen[t.group, t.query_id]} "
                                f"of group {t.group}: one id, one task")
        tasks.append(t)
    return tasks


_WORDS = {str: "text", list: "a list", dict: "an object"}


def _get(d, key, kind, default=None):
    """d[key] (or default, when given, if it is missing), which must be a `kind`: else ValueError naming key."""
    if key not in d and default is None:
        raise ValueError(f"missing '{key}'")
    v = d.get(key, default)
    if not isinstance(v, kind):
        raise ValueError(f"'{key}' must be {_WORDS[kind]}, got {type(v).__name__} {str(v)[:40]!r}")
    return v


def _texts(d, key):
    v = _get(d, key, list)
    if not all(isinstance(x, str) for x in v):
        raise ValueError(f"'{key}' must be a list of text")
    return v


def _query_id(d):
    """The query_id: an integer, or the decimal text of one (formats.integer_id); never 7.9 read as 7."""
    from harness import formats
    qid = formats.integer_id(d["query_id"])
    if qid is None:
        raise ValueError(f"query_id {d['query_id']!r:.40} is not an integer")
    return qid


def _bench_task(d, schemas):
    names = _texts(d, "functions")
    unknown = [n for n in names if n not in schemas]
    if unknown:
        raise ValueError(f"function {unknown[0][:60]!r} is not one of the file's 'functions'")
    fs = [_schema(schemas[n]) for n in names]
    answer = _get(d, "answer", list, [])
    if not all(type(a) in (str, int, float) for a in answer):
        raise ValueError("'answer' must be a list of facts (text or numbers)")
    return Task(_query_id(d), _get(d, "query", str), [{k: f[k] for k in ("name", "description", "parameters")} for f in fs],
                _texts(d, "relevant"), d["group"], {f["name"]: [f["category"], f["tool"], f["api"]] for f in fs},
                [str(a) for a in answer], [_expert_step(k, s) for k, s in enumerate(_get(d, "expert", list, []))])


def _schema(f):
    """A function of the benchmark's 'functions': its schema, and the tool server's names for it."""
    if not (isinstance(f, dict) and all(isinstance(f.get(k), str) for k in ("name", "description", "category", "tool", "api"))
            and isinstance(f.get("parameters"), dict)):
        raise ValueError(f"function {str(f)[:60]!r}: needs text 'name', 'description', 'category', 'tool', 'api' "
                         "and an object 'parameters'")
    return f


def _expert_step(k, s):
    """An expert step {thought, name, arguments}: what SFT formats into an action."""
    if not (isinstance(s, dict) and isinstance(s.get("thought"), str) and isinstance(s.get("name"), str)
            and isinstance(s.get("arguments"), dict)):
        raise ValueError(f"expert step {k}: needs a string 'thought' and 'name' and an object 'arguments', got {str(s)[:80]}")
    return s


_PARAM_TYPES = {"NUMBER": "integer", "STRING": "string", "BOOLEAN": "boolean"}  # ToolBench's map; else string


def _stb_task(d, group):
    functions, api = [], {}
    for j, a in enumerate(_get(d, "api_list", list)):
        if not isinstance(a, dict):
            raise ValueError(f"api_list[{j}] must be an object")
        tool, api_name, category = (_get(a, k, str) for k in ("tool_name", "api_name", "category_name"))
        name = function_name(tool, api_name)
        params = {"type": "object", "properties": {}, "required": [], "optional": []}
        for kind in ("required", "optional"):
            for p in a.get(f"{kind}_parameters") or []:  # names and types as ToolBench shows them
                if not (isinstance(p, dict) and isinstance(p.get("name"), str)
                        and all(isinstance(p.get(k) or "", str) for k in ("type", "description"))):
                    raise ValueError(f"api_list[{j}]: each of '{kind}_parameters' needs a text 'name' (and text "
                                     "'type', 'description')")
                pname = change_name(standardize(p["name"]))
                params["properties"][pname] = {"type": _PARAM_TYPES.get(p.get("type"), "string"),
                                               "description": p.get("description") or ""}
                params[kind].append(pname)
        desc = a.get("api_description") or ""
        if not isinstance(desc, str):
            raise ValueError(f"api_list[{j}]: 'api_description' must be text")
        functions.append({"name": name, "description": desc[:256], "parameters": params})
        api[name] = [category, tool, api_name]
    pairs = _get(d, "relevant APIs", list, [])
    if not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in pairs):
        raise ValueError("'relevant APIs' must be a list of [tool name, API name] pairs")
    return Task(_query_id(d), _get(d, "query", str), functions, [function_name(t, n) for t, n in pairs],
                d.get("group", group), api)


# ---- the prompt -----------------------------------------------------------------------------
SYSTEM = ("Answer the query with function calls. Each turn write Thought: ..., Action: <function>, "
          "Action Input: <JSON>. End with Action: Finish.\nFunctions:\n{functions}")


def render_function(f):
    p = f.get("parameters", {})
    req = set(p.get("required", []))
    args = ", ".join(f"{k}{'' if k in req else '?'}: {v.get('type', 'string')}"
                     for k, v in p.get("properties", {}).items())
    return f"{f['name']}({args}) - {' '.join(str(f.get('description', '')).split())}"  # one line per function


def initial_messages(task):
    """s_0: system prompt with the offered functions (+ Finish) and the user query."""
    functions = "\n".join(render_function(f) for f in task.functions + [FINISH])
    return [{"role": "system", "content": SYSTEM.format(functions=functions)},
            {"role": "user", "content": task.query}]


def format_action(thought, name, arguments):
    """The canonical ReAct text of an action (expert turns are written this way)."""
    return f"Thought: {thought}\nAction: {name}\nAction Input: {json.dumps(arguments)}"


# ---- actions --------------------------------------------------------------------------------
@dataclass
class Action:
    name: str = ""
    arguments: dict = field(default_factory=dict)
    thought: str = ""
    error: str = ""  # non-empty: the turn could not be parsed; this text becomes the observation


_FENCE = re.compile(r"```[a-zA-Z]*")
_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*(.*)$", re.I | re.M)  # [ \t], not \s: stay on one line
_INPUT = re.compile(r"^\s*Action\s*Input\s*:\s*", re.I | re.M)
_THOUGHT = re.compile(r"Thought\s*:\s*(.*?)(?=^\s*Action\s*:|\Z)", re.I | re.M | re.S)


def parse_action(text):
    """One assistant turn -> Action; tolerant of whitespace, code fences, no Thought, trailing text."""
    text = _FENCE.sub("", text)
    m = _ACTION.search(text)
    if not m:
        return Action(error="Parse error: no 'Action:' line. Write Thought, Action and Action Input.")
    name = m.group(1).strip().strip("`'\"").split()[0] if m.group(1).strip() else ""
    t = _THOUGHT.search(text[:m.start()] + "\n")
    thought = t.group(1).strip() if t else text[:m.start()].strip()
    i = _INPUT.search(text, m.end())
    if not name:
        return Action(thought=thought, error="Parse error: 'Action:' names no function.")
    raw = text[i.end():].strip() if i else ""
    if not raw:
        return Action(name, {}, thought)
    args, error = _arguments(raw)
    return Action(name, args, thought, error) if error else Action(name, args, thought)


_BAD_LITERAL = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)


def _arguments(raw):
    """Action Input text -> (dict, "") or ({}, error). The first JSON value decides; text after it is
    ignored. A Python-literal dict ({'a': 1}, True, None) is accepted as data, never run as code."""
    dec = json.JSONDecoder()
    if not raw.startswith("{"):
        try:
            dec.raw_decode(raw)  # a JSON value that is not an object: a list, a string, ...
            return {}, "Parse error: Action Input must be a JSON object."
        except (ValueError, RecursionError):
            if "{" not in raw:
                return {}, "Parse error: Action Input is not valid JSON."
            raw = raw[raw.index("{"):]  # e.g. a quoted object: '{"a": 1}'
    try:
        return dec.raw_decode(raw)[0], ""
    except (ValueError, RecursionError) as e:
        error = f"Parse error: Action Input is not valid JSON ({str(e)[:100]})."
    ends = [j for j, ch in enumerate(raw) if ch == "}"][:64]  # the shortest literal that parses wins
    for j in ends:
        try:
            value = ast.literal_eval(raw[:j + 1])
        except _BAD_LITERAL:
            continue
        if not isinstance(value, dict):
            return {}, "Parse error: Action Input must be a JSON object."
        try:  # sets, bytes, tuple keys ... are not JSON: refuse them here, not in the tool client
            return json.loads(json.dumps(value)), ""
        except _BAD_LITERAL:
            return {}, "Parse error: Action Input has values that JSON cannot carry."
    return {}, error


# ---- the tool server client -----------------------------------------------------------------
class ToolServerError(RuntimeError):
    pass


class ToolClient:
    """POSTs calls to a StableToolBench-compatible server; retries connection errors and 5xx."""

    def __init__(self, url, timeout=30.0, retries=3, backoff=0.5, workers=16):
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff
        self.pool = ThreadPoolExecutor(workers)
        self.local = threading.local()  # one requests.Session per thread

    def _session(self):
        if not hasattr(self.local, "s"):
            self.local.s = requests.Session()
            # A loopback server is never behind a proxy: ignore HTTP(S)_PROXY for it (requests would not).
            self.local.s.trust_env = urlsplit(self.url).hostname not in ("127.0.0.1", "localhost", "::1")
        return self.local.s

    def check(self):
        """Fail fast, with the URL, when no server answers /health."""
        try:
            r = self._session().get(self.url + "/health", timeout=min(self.timeout, 5))
            r.raise_for_status()
        except requests.RequestException as e:
            raise ToolServerError(f"tool server at {self.url} is not reachable ({e}); start one with "
                                  f"`python server.py` or pass --tool-server URL") from None

    def call(self, category, tool_name, api_name, arguments):
        payload = {"category": category, "tool_name": tool_name, "api_name": api_name,
                   "tool_input": json.dumps(arguments), "strip": "", "toolbench_key": ""}
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self._session().post(self.url + "/virtual", json=payload, timeout=self.timeout)
            except requests.RequestException as e:
                last = e
                continue
            if r.status_code >= 500:
                last = f"HTTP {r.status_code}"
                continue
            if r.status_code != 200:
                return {"error": f"tool server answered HTTP {r.status_code}: {r.text[:200]}", "response": ""}
            try:
                return r.json()
            except ValueError:
                return {"error": "tool server answered invalid JSON", "response": r.text[:200]}
        raise ToolServerError(f"tool server at {self.url} unreachable after {self.retries + 1} tries: {last}")

    def map(self, fn, items):
        """Run fn over items concurrently (the calls of many episodes at once)."""
        return list(self.pool.map(fn, items))


# ---- the environment ------------------------------------------------------------------------
@dataclass
class Step:
    text: str                 # the assistant turn as generated
    name: str = ""            # the function it called ("" if it did not parse)
    arguments: dict = field(default_factory=dict)
    observation: str = ""     # what the model saw next ("" after Finish)
    record: dict = None       # the server's raw record; None when no call was made
    error: str = ""           # parse error / unknown function / bad Finish


@dataclass
class Trajectory:
    query_id: int
    query: str
    group: str
    steps: list = field(default_factory=list)
    finish: str = ""          # "give_answer", "give_up", or "" (never finished)
    final_answer: str = ""
    end: str = ""             # "finish", "max_steps", "max_context", "server_error"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{**d, "steps": [Step(**s) for s in d.get("steps", [])]})


class ToolEnv:
    """One episode at a time: reset(task) -> messages; step(assistant_text) -> obs, done, info."""

    def __init__(self, client, max_steps=12, obs_chars=1024, observation_role="function"):
        self.client, self.max_steps, self.obs_chars, self.role = client, max_steps, obs_chars, observation_role
        self.done = False          # not started is not over (rollout.py waits for every env to be done)

    def reset(self, task):
        self.task, self.done = task, False
        self.offered = {f["name"] for f in task.functions}
        self.messages = initial_messages(task)
        self.traj = Trajectory(task.query_id, task.query, task.group)
        return self.messages

    def step(self, text):
        assert not self.done, "episode is over; call reset()"
        act, step = parse_action(text), Step(text)
        step.name, step.arguments, step.error = act.name, act.arguments, act.error
        self.messages.append({"role": "assistant", "content": text})
        if not act.error and act.name == "Finish":
            kind = act.arguments.get("return_type")
            if kind == "give_answer":
                self.traj.finish, self.traj.final_answer = "give_answer", str(act.arguments.get("final_answer", ""))
            elif kind == "give_up_and_restart":
                self.traj.finish = "give_up"
            else:
                step.error = 'Finish needs "return_type": "give_answer" or "give_up_and_restart".'
        elif not act.error and act.name not in self.offered:
            step.error = f"No such function name: {act.name}"
        elif not act.error:
            cat, tool, api = self.task.api[act.name]
            step.record = self.client.call(cat, tool, api, act.arguments)
        if step.error:
            step.record = None
            step.observation = json.dumps({"error": step.error, "response": ""})
        elif step.record is not None:
            step.observation = json.dumps(step.record, ensure_ascii=False)[:self.obs_chars]
        self.traj.steps.append(step)
        if self.traj.finish:
            self.done, self.traj.end = True, "finish"
        elif len(self.traj.steps) >= self.max_steps:
            self.done, self.traj.end = True, "max_steps"
        else:
            self.messages.append({"role": self.role, "content": step.observation})
        return step.observation, self.done, step

    def end(self, reason):
        """End the episode from outside (e.g. the context is full); completed steps are kept."""
        self.done, self.traj.end = True, reason


def step_all(client, envs, texts):
    """Step many episodes at once; their tool calls run concurrently."""
    return client.map(lambda et: et[0].step(et[1]), list(zip(envs, texts)))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Render the prompt of tasks")
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--show", type=int, default=1, help="how many tasks to render")
    a = ap.parse_args()
    for t in load_tasks(a.tasks)[:a.show]:
        for m in initial_messages(t):
            print(f"<{m['role']}>\n{m['content']}\n")
