"""The tool-use decision process of StepTool (paper Sec. 3): tasks, prompt, actions, tool client.

    state s_t   the dialogue so far: system prompt (the offered functions + Finish), user query,
                earlier assistant turns and tool observations             -> ToolEnv.messages
    action a_t  one assistant turn in ReAct form                         -> parse_action
                    Thought: ...\\nAction: <function>\\nAction Input: <JSON>
                the last action calls Finish with give_answer / give_up_and_restart
    transition  the tool server's answer {"error": ..., "response": ...} -> ToolEnv.step, through a
                client (harness/toolclient.py: HTTP, retries, calls of many episodes at once)

A finished episode is a `Trajectory`; reward.py scores its steps, a judge its answer (eval.py: Pass Rate).

    python -m harness.formats --tasks data/bench_test.json --show 1    # render one task's prompt

Departures from ToolBench / the original code:
1. The system prompt is short: one line per function (name, parameters, description) instead of
   ToolBench's ~1,000-character instruction and full JSON schemas, so a small model's episodes
   stay short. Function names follow ToolBench's convention exactly (`function_name`), and so do
   the parameter names and types of StableToolBench APIs (`change_name(standardize(name))`).
2. An action that cannot be parsed, or names a function that is not offered, becomes an error
   observation and the episode goes on (ToolBench does the same for unknown names).
3. ToolBench's `standardize` keeps the character '^' (a quirk of its regex); so do we: names match its server's.
"""
import ast
import json
import re
from dataclasses import dataclass, field


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


@dataclass
class Task:  # one query; task files are read by harness.formats.load_tasks
    query_id: int
    query: str
    functions: list  # OpenAI-style schemas {name, description, parameters}, Finish not included
    relevant: list   # function names of the relevant APIs (Recall's ground truth)
    group: str       # G1 / G2 / G3, or a StableToolBench group such as G1_instruction
    api: dict        # function name -> [category, tool_name, api_name] for the tool server
    answer: list = field(default_factory=list)  # facts the final answer must contain (embedded tasks)
    expert: list = field(default_factory=list)  # [{thought, name, arguments}], last one Finish
    world: object = None  # a tool world's own env and rules (harness/bfcl.py: Env, is_solved, passed, contribution)


# ---- the prompt -----------------------------------------------------------------------------
SYSTEM = ("Answer the query with function calls. Each turn write Thought: ..., Action: <function>, "
          "Action Input: <JSON>. End with Action: Finish.\nFunctions:\n{functions}")


def render_function(f):
    p = f.get("parameters", {})
    req = set(p.get("required", []))
    args = ", ".join(f"{k}{'' if k in req else '?'}: {v.get('type', 'string')}" for k, v in p.get("properties", {}).items())
    return f"{f['name']}({args}) - {' '.join(str(f.get('description', '')).split())}"  # one line per function


def initial_messages(task):
    """s_0: system prompt with the offered functions (+ Finish) and the user query."""
    functions = "\n".join(render_function(f) for f in task.functions + [FINISH])
    return [{"role": "system", "content": SYSTEM.format(functions=functions)}, {"role": "user", "content": task.query}]


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
    args, error = _arguments(raw) if raw else ({}, "")  # no Action Input: no arguments
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

