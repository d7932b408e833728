"""BFCL multi-turn (the Berkeley Function Calling Leaderboard, v4): a third-party tool world, offline, no judge.

    python steptool.py --model smollm2 --tasks bfcl:multi_turn/train --eval-tasks bfcl:multi_turn_base/test
    python eval.py --model smollm2 --adapters A --tasks bfcl:multi_turn_base/test:10 --out out/bfcl
    python -m harness.bfcl --rescore RUN/eval_trajectories.jsonl.gz   # a run's recorded calls, scored again

A task spec is `bfcl:CATEGORY[/PART][:N]`: CATEGORY one of the four multi-turn categories below, or
`multi_turn` for all four; PART `train` or `test` (scenario-disjoint: a scenario, the entry number the
four categories share, is in the test part when its number is a multiple of 5, in every category);
N the first N entries. The first use fetches the pinned wheel `bfcl-eval` from the package index (no
dependencies), checks its sha256 and copies its data and the multi-turn tool classes into the cache
($STEPTOOL_CACHE, as `--model smollm2`); later runs need no network.

An entry is one episode of several user turns. The policy answers each turn in our ReAct form, one
call a step, and ends the turn with `Finish`; the next user turn arrives as the observation, and the
tool classes keep their state across turns. A call runs a public method of the entry's class instances,
as BFCL's executor does (also one the prompt does not document yet: one ground-truth call in 800 needs
that), with the JSON object the action gives as its arguments; nothing the model writes is evaluated
as code. The ground-truth calls (Python call strings) are
read with `ast`, names and literal arguments only.

The checker, as BFCL's (bfcl_eval/eval_checker/multi_turn_eval/multi_turn_checker.py): after each user
turn with ground-truth calls, those calls run on a second set of instances (created from the same
`initial_config`, kept across turns), then (1) every public attribute of each model instance equals the
ground-truth instance's, and (2) every ground-truth call's result (as BFCL renders it: text, JSON of a
dict, else str) is among the results of all the model's calls so far, each used once; a turn where the
model made no call fails. A turn without ground-truth calls is not checked (BFCL's checker skips it too). An entry passes when every checked turn
passes and the episode reached its last turn's Finish (BFCL fails a force-terminated entry).

Step rewards (reward.py asks the task's world): SuccCalling as reward.succ_calling reads the record (a
call that raised, returned {"error": ...} or a list of errors, failed; a Finish is no call); Contribution 1
when the call (name and arguments, positional ones by name, defaults filled in) is one of its turn's
ground-truth calls not yet matched, and for a Finish that ends a user turn 1 when the turn passes its
check (a turn without ground truth: when it made no call), else 0; IsSolved (the last step) 1 when the
entry passes, 0.5 when some checked turns pass, 0 when none does. The 0.5 is a training reward only: the
evaluation scores BFCL's way (`passed`: an entry passes or fails).

Departures from BFCL: the prompt is ours (one line per function, ReAct turns), not BFCL's prompting or
function-calling formats, so accuracies are not the leaderboard's; a turn takes at most --max-steps
steps (BFCL: 20); a missed function (miss_func) arrives as a user message naming it; an entry's
`excluded_function` are left out of its prompt (this BFCL version's own code never reads the field); a
call to a name that is no method is an error of ours (BFCL's eval() records a NameError as a result);
an integer power with an exponent over 10,000 or a precision over 1,000 digits is refused (BFCL would
run it, for as long as it takes); the calls of episodes stepped in threads run one at a time.
"""
import ast
import copy
import importlib
import inspect
import json
import os
import sys
import tempfile
import threading
import zipfile

import env
from harness import cache

WHEEL, SHA256 = "bfcl-eval==2026.3.23", "3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a"
CATEGORIES = ("multi_turn_base", "multi_turn_miss_param", "multi_turn_miss_func", "multi_turn_long_context")
SOURCE = "bfcl_eval/eval_checker/multi_turn_eval/func_source_code"
CLASSES = {"GorillaFileSystem": ("gorilla_file_system", "gorilla_file_system.json"),
           "MathAPI": ("math_api", "math_api.json"), "MessageAPI": ("message_api", "message_api.json"),
           "TwitterAPI": ("posting_api", "posting_api.json"), "TicketAPI": ("ticket_api", "ticket_api.json"),
           "TradingBot": ("trading_bot", "trading_bot.json"), "TravelAPI": ("travel_booking", "travel_booking.json"),
           "VehicleControlAPI": ("vehicle_control", "vehicle_control.json")}
STATELESS = {"MathAPI"}     # no scenario to load (BFCL's STATELESS_CLASSES)
TEST_EVERY = 5              # scenario k is in the test part when k % 5 == 0
# ours, not BFCL's: a call that would run without bound gets an error (an integer power, an mpmath precision)
MAX_EXPONENT, MAX_PRECISION = 10_000, 1_000
_CALLS = threading.Lock()   # episodes step in threads; MathAPI sets mpmath's precision, one global, as it computes


# ---- the wheel, once ------------------------------------------------------------------------
def folder():
    return os.path.join(cache.cache_dir(), "bfcl-eval-" + SHA256[:16])


def members(names):
    """The wheel's files we use: the four categories' entries and answers, the function docs, the classes."""
    want = {f"bfcl_eval/data/BFCL_v4_{c}.json" for c in CATEGORIES} | \
           {f"bfcl_eval/data/possible_answer/BFCL_v4_{c}.json" for c in CATEGORIES} | \
           {f"bfcl_eval/data/multi_turn_func_doc/{doc}" for _, doc in CLASSES.values()} | \
           {f"{SOURCE}/{mod}.py" for mod, _ in CLASSES.values()} | {f"{SOURCE}/long_context.py"}
    missing = sorted(want - set(names))
    return sorted(want), missing


def fetch():
    """The cache folder with the wheel's data and classes: fetched and checked the first time only."""
    out = folder()
    if cache.json_of(os.path.join(out, "source.json")).get("sha256") == SHA256:
        return out
    os.makedirs(cache.cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.cache_dir(), prefix=".bfcl-") as tmp:
        wheel = cache.download_wheel(WHEEL, SHA256, tmp, "--tasks bfcl", "BFCL's data and tool classes")
        with zipfile.ZipFile(wheel) as z:
            want, missing = members(z.namelist())
            if missing:
                raise ValueError(f"--tasks bfcl: {os.path.basename(wheel)} lacks {missing[0]}")
            stage = os.path.join(tmp, "out")
            for m in want:
                z.extract(m, stage)
        for pkg in ("bfcl_eval", "bfcl_eval/eval_checker", "bfcl_eval/eval_checker/multi_turn_eval", SOURCE):
            open(os.path.join(stage, pkg, "__init__.py"), "w").close()   # the package path only, not its own __init__s
        os.replace(wheel, os.path.join(stage, os.path.basename(wheel)))   # kept: tests run BFCL's own checker from it
        with open(os.path.join(stage, "source.json"), "w") as f:
            json.dump({"wheel": WHEEL, "sha256": SHA256}, f)
        if os.path.isdir(out):
            os.rename(out, os.path.join(tmp, "old"))   # an earlier, incomplete copy of ours
        os.rename(stage, out)
    return out


def tool_class(name):
    """A BFCL tool class, imported from the cached copy of the wheel (its own code: stdlib only, mpmath for MathAPI)."""
    root = fetch()
    pkg = sys.modules.get("bfcl_eval")
    if pkg is not None and not list(pkg.__path__)[0].startswith(root):   # imported from another cache folder
        for m in [m for m in sys.modules if m == "bfcl_eval" or m.startswith("bfcl_eval.")]:
            del sys.modules[m]
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    return getattr(importlib.import_module(f"{SOURCE.replace('/', '.')}.{CLASSES[name][0]}"), name)


# ---- ground-truth calls: read, never run as code ------------------------------------------------
def parse_call(text):
    """"mv(source='a', destination='b')" -> ("mv", [positional values], {keyword: value}); literals only."""
    node = ast.parse(text.strip(), mode="eval").body
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"not a plain function call: {text[:80]!r}")
    return node.func.id, [ast.literal_eval(a) for a in node.args], {k.arg: ast.literal_eval(k.value) for k in node.keywords}


def keywords(method, args, kwargs):
    """Positional arguments named by the method's signature: the call as our actions make it."""
    names = [p for p in inspect.signature(method).parameters]
    return {**dict(zip(names, args)), **kwargs}


def render(result):
    """A call's result as BFCL's executor records it: text as is, a dict as JSON (else str), anything else str."""
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            return str(result)
    return str(result)


class Instances:
    """One set of an entry's class instances, made from its initial_config, and the calls that run on them."""

    def __init__(self, entry, long_context):
        self.objs = {}
        for name in entry["involved_classes"]:
            obj = tool_class(name)()
            if name not in STATELESS:
                obj._load_scenario(copy.deepcopy(entry["initial_config"].get(name, {})), long_context=long_context)
                obj = copy.deepcopy(obj)   # long context: TravelAPI adds module-level dicts, shared by every instance
            self.objs[name] = obj
        self.methods = {m: getattr(o, m) for o in self.objs.values() for m, _ in inspect.getmembers(o, inspect.ismethod)
                        if not m.startswith("_")}

    def call(self, name, arguments):
        """-> the method's result, rendered; an exception is BFCL's "Error during execution: ..." text."""
        e, p = arguments.get("exponent"), arguments.get("precision")
        if type(e) is int and type(arguments.get("base")) is int and abs(e) > MAX_EXPONENT:
            return f"Error during execution: an integer power's exponent is at most {MAX_EXPONENT} here"
        if type(p) is int and p > MAX_PRECISION:
            return f"Error during execution: the precision is at most {MAX_PRECISION} digits here"
        try:
            with _CALLS:
                return render(self.methods[name](**arguments))
        except Exception as e:  # noqa: BLE001 -- a tool's failure is the model's observation, as in BFCL
            return f"Error during execution: {e}"

    def state(self):
        """Each instance's public attributes (what BFCL's state checker compares)."""
        return {n: {k: v for k, v in vars(o).items() if not k.startswith("_")} for n, o in self.objs.items()}


# ---- tasks ------------------------------------------------------------------------------------
def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def short(doc):
    """A function doc without BFCL's class preamble ("This tool belongs to ... Tool description: ...")."""
    d = str(doc.get("description", ""))
    return {**doc, "description": d.split("Tool description: ", 1)[-1]}


def load_tasks(spec):
    """`bfcl:CATEGORY[/PART][:N]` -> [BfclTask]; a bad spec is a ValueError naming it."""
    body = spec[len("bfcl:"):]
    body, _, n = body.partition(":")
    cat, _, part = body.partition("/")
    cats = CATEGORIES if cat == "multi_turn" else (cat,) if cat in CATEGORIES else None
    if cats is None or part not in ("", "train", "test") or (n and not n.isdigit()):
        raise ValueError(f"{spec}: expected bfcl:CATEGORY[/train|/test][:N], CATEGORY one of multi_turn, "
                         f"{', '.join(CATEGORIES)}")
    root = fetch()
    docs = {}
    for name, (_, doc) in CLASSES.items():
        docs[name] = [short(d) for d in read_lines(os.path.join(root, "bfcl_eval/data/multi_turn_func_doc", doc))]
    tasks = []
    for c in cats:
        truth = {e["id"]: e["ground_truth"] for e in read_lines(os.path.join(root, f"bfcl_eval/data/possible_answer/BFCL_v4_{c}.json"))}
        entries = read_lines(os.path.join(root, f"bfcl_eval/data/BFCL_v4_{c}.json"))
        picked = [e for e in entries if not part or (scenario(e["id"]) % TEST_EVERY == 0) == (part == "test")]
        tasks += [BfclTask.make(e, truth[e["id"]], c, docs) for e in picked[:int(n) if n else None]]
    return tasks


def scenario(entry_id):
    return int(entry_id.rsplit("_", 1)[1])


class BfclTask(env.Task):
    """An entry: env.Task's fields (query = the first user turn, functions = the documented ones at the start,
    relevant = the ground truth's function names, expert = its calls with a Finish closing each turn), plus
    the entry, its ground truth per turn (as text, and as `calls`: [(name, keyword arguments)], read once), the
    functions a later turn adds, and the world (this module)."""

    @classmethod
    def make(cls, e, truth, category, docs):
        excluded = set(e.get("excluded_function", []))
        missed = {int(k): v for k, v in e.get("missed_function", {}).items()}
        later = {f for fs in missed.values() for f in fs}
        all_docs = [d for c in e["involved_classes"] for d in docs[c] if d["name"] not in excluded]
        turns = [" ".join(m["content"] for m in q if m["role"] == "user") for q in e["question"]]
        t = cls(scenario(e["id"]), turns[0], [d for d in all_docs if d["name"] not in later],
                sorted({parse_call(c)[0] for turn in truth for c in turn}), category, {})
        t.entry, t.truth, t.turns, t.category = e, truth, turns, category
        t.added = {k: [d for d in all_docs if d["name"] in fs] for k, fs in missed.items()}
        t.world = sys.modules[__name__]
        methods = Instances(e, "long_context" in category).methods   # read once: (name, keyword arguments) per turn
        t.calls = [[(n, keywords(methods[n], a, kw) if n in methods else kw) for n, a, kw in map(parse_call, turn)]
                   for turn in truth]
        t.expert = expert_steps(t)
        return t


def expert_steps(task):
    """The ground truth as our expert trajectory: each turn's calls (positional arguments named), then Finish."""
    steps = []
    for k, turn in enumerate(task.calls):
        for name, arguments in turn:
            steps.append({"thought": "I call the next function of this request.", "name": name, "arguments": arguments})
        done = "All requests are done." if k == len(task.truth) - 1 else "This request is done."
        steps.append({"thought": done, "name": "Finish", "arguments": {"return_type": "give_answer", "final_answer": done}})
    return steps


# ---- the environment and the checker ------------------------------------------------------------
class BfclEnv(env.ToolEnv):
    """env.ToolEnv's interface over an entry's user turns: reset(task) -> messages; step(text) -> obs, done, step.
    A Finish ends the user turn: the turn is checked and the next one is the observation (role user)."""

    def reset(self, task):
        self.task, self.done, self.turn, self.turn_steps = task, False, 0, 0
        long = "long_context" in task.category
        self.model, self.truth = Instances(task.entry, long), Instances(task.entry, long)
        self.offered = {f["name"] for f in task.functions}
        self.results, self.matched = [], []          # every model call's rendered result; the turn's matched truth calls
        self.messages = env.initial_messages(task)
        self.traj = env.Trajectory(task.query_id, task.query, task.group)
        self.traj.turn_passed = []
        return self.messages

    def step(self, text):
        assert not self.done, "episode is over; call reset()"
        act, step = env.parse_action(text), env.Step(text)
        step.name, step.arguments, step.error = act.name, act.arguments, act.error
        self.messages.append({"role": "assistant", "content": text})
        self.traj.steps.append(step)
        self.turn_steps += 1
        step.contribution = 0.0
        if not act.error and act.name == "Finish":
            return self.end_turn(step, act)
        if not act.error and act.name not in self.model.methods:
            step.error = f"No such function name: {act.name}"
        if step.error:
            step.observation = json.dumps({"error": step.error, "response": ""})
        else:
            result = self.model.call(act.name, act.arguments)
            self.results.append(result)
            failed = failed_result(result)
            step.record = {"error": result if failed else "", "response": "" if failed else result}
            step.observation = result[:self.obs_chars]
            step.contribution = self.contribution(act.name, act.arguments)
        if self.turn_steps >= self.max_steps:
            self.done, self.traj.end = True, "max_steps"
        else:
            self.messages.append({"role": self.role, "content": step.observation})
        return step.observation, self.done, step

    def calls_this_turn(self):
        k = len(self.traj.steps) - 1                        # the Finish just taken
        return [s for s in self.traj.steps[k - self.turn_steps + 1:k]
                if s.record is not None or s.error.startswith("No such function name")]   # BFCL decodes those too

    def contribution(self, name, arguments):
        """1 when (name, arguments) is one of this turn's ground-truth calls not matched yet (defaults filled in
        on both sides: ls() and ls(a=False) are one call), else 0."""
        method = self.truth.methods.get(name)
        mine = with_defaults(method, arguments)
        for i, (n, kwargs) in enumerate(self.task.calls[self.turn] if self.turn < len(self.task.calls) else []):
            if i not in self.matched and n == name and with_defaults(method, kwargs) == mine:
                self.matched.append(i)
                return 1.0
        return 0.0

    def end_turn(self, step, act):
        if act.arguments.get("return_type") != "give_answer":
            act.arguments = {**act.arguments, "return_type": "give_answer"}   # a give-up ends the turn as well
        truth, calls = self.task.truth[self.turn], self.calls_this_turn()
        if truth:   # BFCL fails a turn with ground truth where the model made no call at all
            self.traj.turn_passed.append(check_turn(self.model, self.truth, self.task.calls[self.turn], self.results)
                                        and bool(calls))
        # Contribution of the Finish that ends a turn: its turn passes (a turn without ground truth: no call made)
        step.contribution = float(self.traj.turn_passed[-1] if truth else not calls)
        self.turn, self.turn_steps, self.matched = self.turn + 1, 0, []
        if self.turn >= len(self.task.truth):
            self.traj.finish, self.traj.final_answer = "give_answer", str(act.arguments.get("final_answer", "")) or "done"
            self.done, self.traj.end = True, "finish"
            return "", True, step
        added = self.task.added.get(self.turn, [])
        self.offered |= {f["name"] for f in added}
        note = ("New functions are available:\n" + "\n".join(env.render_function(f) for f in added)) if added else ""
        step.observation = "\n".join(x for x in (note, self.task.turns[self.turn]) if x) or "Continue."
        self.messages.append({"role": "user", "content": step.observation})
        return step.observation, False, step


def with_defaults(method, kwargs):
    """kwargs with the method's defaults filled in; as given when they do not bind (or no such method)."""
    try:
        bound = inspect.signature(method).bind(**kwargs)
    except (TypeError, ValueError):
        return kwargs
    bound.apply_defaults()
    return dict(bound.arguments)


def failed_result(result):
    """A rendered result that is a failure: an exception's text, or (TradingBot, TicketAPI) a list of errors."""
    if result.startswith("Error during execution"):
        return True
    try:
        items = ast.literal_eval(result) if result.startswith("[") else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False
    return isinstance(items, list) and bool(items) and all(
        (isinstance(x, str) and x.startswith("Error")) or (isinstance(x, dict) and "error" in x) for x in items)


def check_turn(model, truth_inst, truth_calls, results):  # truth_calls: [(name, keyword arguments)]
    """BFCL's check of one turn: run its ground-truth calls on the ground-truth instances, then the states equal
    and every ground-truth result among the model's results so far (each used once)."""
    expected = [truth_inst.call(name, copy.deepcopy(kwargs)) if name in truth_inst.methods   # a method may change a list
                else f"Error during execution: name '{name}' is not defined" for name, kwargs in truth_calls]
    if model.state() != truth_inst.state():
        return False
    left = list(results)
    for r in expected:
        if r not in left:
            return False
        left.remove(r)
    return True


# ---- what reward.py and the evaluation ask of a task's world --------------------------------------
def is_solved(task, traj):
    """IsSolved, the training reward: 1 when the entry passes (every checked turn, and the last turn reached),
    0.5 (Unsure) when some turns pass, else 0. The partial credit is ours: BFCL scores an entry pass or fail (passed)."""
    passed = getattr(traj, "turn_passed", [])
    checked = sum(1 for t in task.truth if t)
    if traj.end == "finish" and len(passed) == checked and all(passed):
        return 1.0
    return 0.5 if any(passed) else 0.0


def passed(task, traj):
    """BFCL's verdict, what the evaluation scores: 1 when the entry passes, else 0 (no partial credit)."""
    return float(is_solved(task, traj) == 1.0)


def contribution(step):
    return getattr(step, "contribution", 0.0)


Env = BfclEnv   # what rollout.py makes for a task of this world


# ---- a run's recorded evaluation, scored again ------------------------------------------------------
def rescore(path):
    """Replay the calls of a run's eval_trajectories.jsonl.gz (steptool.py's) through this world and checker:
    -> {(category, entry): (passed, some turn passed, the replay saw another response than the run)}. A replay,
    not a new evaluation: where a response differs, the policy might have gone on differently."""
    import gzip
    tasks = {(t.category, t.query_id): t for t in load_tasks("bfcl:multi_turn")}
    out = {}
    with gzip.open(path, "rt") as f:
        for rec in map(json.loads, f):
            task = tasks[(rec["group"], int(rec["query_id"]))]
            # no step limit of its own: the recorded steps end where the run's limit ended them, and an episode
            # without its last Finish fails either way
            e, other = Env(None, max_steps=len(rec["steps"]) + 1), False
            e.reset(task)
            for s in rec["steps"]:
                if e.done:
                    break
                parsed = bool(s["name"]) and not s["error"].startswith("Parse error")   # replayed as a parse error
                obs, _, _ = e.step(env.format_action("", s["name"], s["arguments"]) if parsed else "(unparsed)")
                # the file keeps an observation's first 300 characters (launch.write_trajectories)
                other |= parsed and s["name"] != "Finish" and obs[:300] != s["observation"]
            out[(rec["group"], rec["query_id"])] = (passed(task, e.traj), any(e.traj.turn_passed), other)
    return out


if __name__ == "__main__":   # python -m harness.bfcl: fetch once, then say what the cache holds
    if sys.argv[1:2] == ["--rescore"]:   # python -m harness.bfcl --rescore RUN/eval_trajectories.jsonl.gz
        if len(sys.argv) < 3 or not os.path.isfile(sys.argv[2]):
            given = (sys.argv[2:3] or ["(no file given)"])[0]
            sys.exit(f"harness.bfcl --rescore: {given}: not a run's eval_trajectories.jsonl.gz")
        res = rescore(sys.argv[2])
        for c in sorted({g for g, _ in res}):
            v = [x for (g, _), x in res.items() if g == c]
            print(f"{c}: {len(v)} entries, pass {100 * sum(x[0] for x in v) / len(v):.1f} %, some turn passes "
                  f"{sum(x[1] for x in v)}, another response than recorded in {sum(x[2] for x in v)}")
        sys.exit(0)
    print(fetch())
    for c in CATEGORIES:
        ts = load_tasks(f"bfcl:{c}")
        print(f"{c}: {len(ts)} entries, {sum(len(t.turns) for t in ts) / len(ts):.1f} user turns each, "
              f"test part {sum(t.query_id % TEST_EVERY == 0 for t in ts)}")
