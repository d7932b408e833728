"""BFCL multi-turn as a tool world (harness/bfcl.py): fetched once from a wheel, episodes over user turns,
BFCL's checker (state and responses after each turn), step rewards, and whole runs. A fake wheel of the
same layout, built here, stands in for bfcl-eval: no test downloads. Tests on the real data run where a
run fetched it into $STEPTOOL_CACHE, and skip cleanly elsewhere."""
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT
import env
import reward
from harness import bfcl
from harness import cache as C
from harness import judge as J

TICKETS = '''
ARCHIVE = {"title": "archived " * 20, "priority": 0}   # module-level, as BFCL's TravelAPI long-context records


class TicketAPI:
    def __init__(self):
        self.tickets, self.counter = {}, 0

    def _load_scenario(self, scenario, long_context=False):
        self.tickets, self.counter = dict(scenario.get("tickets", {})), scenario.get("counter", 0)
        if long_context:
            self.tickets["0"] = ARCHIVE

    def power(self, base, exponent):
        return {"result": base ** exponent}

    def create_ticket(self, title, priority=1):
        if not title:
            return {"error": "title is empty"}
        self.counter += 1
        self.tickets[str(self.counter)] = {"title": title, "priority": priority}
        return {"id": self.counter}

    def get_ticket(self, ticket_id):
        t = self.tickets.get(str(ticket_id))
        return t if t else {"error": f"no ticket {ticket_id}"}
'''
DOCS = [{"name": "create_ticket", "description": "This tool belongs to the ticket system. Tool description: Create a ticket.",
         "parameters": {"type": "dict", "properties": {"title": {"type": "string"}, "priority": {"type": "integer"}},
                        "required": ["title"]}},
        {"name": "get_ticket", "description": "Tool description: Show a ticket.",
         "parameters": {"type": "dict", "properties": {"ticket_id": {"type": "integer"}}, "required": ["ticket_id"]}}]


def entry(cat, k, title):
    e = {"id": f"{cat}_{k}", "involved_classes": ["TicketAPI"], "initial_config": {"TicketAPI": {"counter": 5}},
         "question": [[{"role": "user", "content": f"Create a ticket titled '{title}' with priority 2."}],
                      [{"role": "user", "content": "Show me that ticket."}]]}
    truth = [[f"create_ticket(title='{title}', priority=2)"], ["get_ticket(6)"]]     # a positional argument
    if cat == "multi_turn_miss_func":   # get_ticket arrives in a third turn; the second cannot be done
        e["question"].append([])
        e["missed_function"] = {"2": ["get_ticket"]}
        truth = [truth[0], [], truth[1]]
    return e, truth


def fake_wheel(path):
    """A wheel of bfcl-eval's layout: every member harness/bfcl.py reads, one real class (TicketAPI), stubs."""
    with zipfile.ZipFile(path, "w") as z:
        for cat in bfcl.CATEGORIES:
            es = [entry(cat, k, t) for k, t in ((0, "Printer"), (1, "Router"), (5, "Scanner"))]
            z.writestr(f"bfcl_eval/data/BFCL_v4_{cat}.json", "".join(json.dumps(e) + "\n" for e, _ in es))
            z.writestr(f"bfcl_eval/data/possible_answer/BFCL_v4_{cat}.json",
                       "".join(json.dumps({"id": e["id"], "ground_truth": t}) + "\n" for e, t in es))
        for name, (mod, doc) in bfcl.CLASSES.items():
            lines = DOCS if name == "TicketAPI" else []
            z.writestr(f"bfcl_eval/data/multi_turn_func_doc/{doc}", "".join(json.dumps(d) + "\n" for d in lines))
            z.writestr(f"{bfcl.SOURCE}/{mod}.py", TICKETS if name == "TicketAPI" else f"class {name}:\n    pass\n")
        z.writestr(f"{bfcl.SOURCE}/long_context.py", "")
        z.writestr("bfcl_eval-0.0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: bfcl-eval\nVersion: 0.0.1\n")
        z.writestr("bfcl_eval-0.0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    return path


@pytest.fixture(scope="module")
def fake_pin(tmp_path_factory):
    d = tmp_path_factory.mktemp("bfcl")
    wheel = fake_wheel(str(d / "bfcl_eval-0.0.1-py3-none-any.whl"))
    return (wheel, hashlib.sha256(open(wheel, "rb").read()).hexdigest()), str(d / "cache")


@pytest.fixture
def fake(fake_pin, monkeypatch):
    """The fake wheel, pinned in place of the real one, fetched into a cache of its own (once a module)."""
    (wheel, digest), cache = fake_pin
    monkeypatch.setenv("STEPTOOL_CACHE", cache)
    monkeypatch.setattr(bfcl, "WHEEL", wheel); monkeypatch.setattr(bfcl, "SHA256", digest)
    return fake_pin


def play(task, turns):
    """Run an episode: `turns` is one list of (name, arguments) per user turn, each followed by a Finish."""
    e = bfcl.Env(None, max_steps=8)
    e.reset(task)
    for calls in turns:
        for name, args in calls:
            e.step(env.format_action("t", name, args))
        e.step(env.format_action("t", "Finish", {"return_type": "give_answer", "final_answer": "done"}))
        if e.done:
            break
    return e


def expert(task):
    e = bfcl.Env(None, max_steps=len(task.expert))
    e.reset(task)
    for s in task.expert:
        e.step(env.format_action(s["thought"], s["name"], s["arguments"]))
    return e


def test_the_wheel_is_fetched_once_checked_and_read_from_the_cache_after(fake, monkeypatch):
    (wheel, digest), cache = fake
    tasks = bfcl.load_tasks("bfcl:multi_turn_base")
    assert [t.query_id for t in tasks] == [0, 1, 5] and os.path.isfile(os.path.join(cache, os.path.basename(bfcl.folder()),
                                                                                       "source.json"))
    monkeypatch.setattr(C, "download_wheel", lambda *a: pytest.fail("fetched twice"))
    assert len(bfcl.load_tasks("bfcl:multi_turn")) == 12                       # all four categories, from the cache
    monkeypatch.undo()
    monkeypatch.setenv("STEPTOOL_CACHE", cache + "-other")
    monkeypatch.setattr(bfcl, "SHA256", "0" * 64)
    with pytest.raises(ValueError, match=r"--tasks bfcl: .* has sha256 .* not the pinned 0{64}; refusing it"):
        bfcl.fetch()


def test_specs_pick_a_category_a_scenario_disjoint_part_and_the_first_n(fake):
    assert [t.query_id for t in bfcl.load_tasks("bfcl:multi_turn_base/test")] == [0, 5]
    train = bfcl.load_tasks("bfcl:multi_turn/train")
    assert {t.query_id for t in train} == {1} and {t.group for t in train} == set(bfcl.CATEGORIES)
    assert len(bfcl.load_tasks("bfcl:multi_turn_miss_func:2")) == 2
    for bad in ("bfcl:multi_turn_web", "bfcl:multi_turn_base/val", "bfcl:multi_turn_base:x"):
        with pytest.raises(ValueError, match="expected bfcl:CATEGORY"):
            bfcl.load_tasks(bad)


def test_ground_truth_passes_every_entry_and_an_empty_policy_none(fake):
    for t in bfcl.load_tasks("bfcl:multi_turn"):
        assert reward.is_solved(t, expert(t).traj) == 1.0, t.group
        assert reward.is_solved(t, play(t, [[]] * len(t.turns)).traj) == 0.0, t.group


def test_state_carries_across_turns_and_a_wrong_call_fails_its_turn(fake):
    t = bfcl.load_tasks("bfcl:multi_turn_base:1")[0]
    ok = play(t, [[("create_ticket", {"title": "Printer", "priority": 2})], [("get_ticket", {"ticket_id": 6})]])
    assert ok.traj.turn_passed == [True, True] and '"Printer"' in ok.traj.steps[-2].observation   # turn 2 sees turn 1's ticket
    wrong = play(t, [[("create_ticket", {"title": "Printer", "priority": 3})], [("get_ticket", {"ticket_id": 6})]])
    assert wrong.traj.turn_passed == [False, False] and reward.is_solved(t, wrong.traj) == 0.0   # the state differs
    # the state matches but the response check fails: turn 2's result never shown
    late = play(t, [[("create_ticket", {"title": "Printer", "priority": 2})], []])
    assert late.traj.turn_passed == [True, False] and reward.is_solved(t, late.traj) == 0.5
    # ... the partial credit is the training reward's only: the evaluation scores BFCL's way, pass or fail
    assert J.FactsJudge()(t, late.traj) == 0.0 and J.FactsJudge()(t, ok.traj) == 1.0
    # an earlier turn's result counts for a later turn (BFCL's response check reads all turns' results) ...
    early = play(t, [[("create_ticket", {"title": "Printer", "priority": 2}), ("get_ticket", {"ticket_id": 6})],
                     [("get_ticket", {"ticket_id": 1})]])
    assert early.traj.turn_passed == [True, True]
    # ... but a turn with ground truth and no call fails, whatever the state
    none = play(t, [[("create_ticket", {"title": "Printer", "priority": 2}), ("get_ticket", {"ticket_id": 6})], []])
    assert none.traj.turn_passed == [True, False]
    # an error result and an unknown name: failed calls, no state change
    bad = play(t, [[("create_ticket", {"title": ""}), ("delete_everything", {})]])
    assert [reward.succ_calling(s) for s in bad.traj.steps[:2]] == [0, 0] and "No such function" in bad.traj.steps[1].error


def test_an_expert_turn_of_more_calls_than_max_steps_is_replayed_whole_for_sft(fake, make_policy):
    """The policy's rollouts take at most --max-steps steps a turn; SFT's replay of the ground truth takes all of
    them (2 of BFCL's 640 train-part entries have a turn of 13 to 35 calls)."""
    import copy
    import rollout
    long = copy.copy(bfcl.load_tasks("bfcl:multi_turn_base:1")[0])
    call = {"thought": "t", "name": "get_ticket", "arguments": {"ticket_id": 6}}
    long.expert = long.expert[:2] + [call] * 14 + long.expert[2:]                  # turn 2: 15 calls, then Finish
    ep, traj = rollout.expert_episode(make_policy(0), long, None)
    assert len(traj.steps) == len(long.expert) == 18 and traj.end == "finish" and traj.turn_passed == [True, True]
    assert sum(ep.act) > 0


def test_the_missed_function_arrives_in_its_turn(fake):
    t = bfcl.load_tasks("bfcl:multi_turn_miss_func:1")[0]
    assert [f["name"] for f in t.functions] == ["create_ticket"] and t.turns[2] == ""
    e = expert(t)
    finishes = [s for s in e.traj.steps if s.name == "Finish"]
    assert "New functions are available:\nget_ticket(ticket_id: integer) - Show a ticket." in finishes[1].observation
    assert e.traj.turn_passed == [True, True] and reward.is_solved(t, e.traj) == 1.0   # the empty-truth turn: not checked


def test_each_instance_owns_its_state_and_a_call_that_would_run_without_bound_is_refused(fake):
    t = bfcl.load_tasks("bfcl:multi_turn_long_context:1")[0]
    a, b = bfcl.Instances(t.entry, True), bfcl.Instances(t.entry, True)
    assert a.objs["TicketAPI"].tickets["0"] == b.objs["TicketAPI"].tickets["0"]
    assert a.objs["TicketAPI"].tickets["0"] is not b.objs["TicketAPI"].tickets["0"]   # not the class module's dict
    assert a.call("power", {"base": 2, "exponent": 10}) == '{"result": 1024}'
    assert a.call("power", {"base": 10, "exponent": 10 ** 9}).startswith("Error during execution: an integer power")
    assert a.call("power", {"base": 10.0, "exponent": 10 ** 9}).startswith("Error during execution")   # OverflowError
    assert "precision is at most" in a.call("power", {"base": 2, "exponent": 1, "precision": 10 ** 7})


def test_a_list_of_errors_is_a_failed_call_and_defaults_count_in_contribution(fake):
    for text, failed in (("Error during execution: x", True), ("['Error: User not authenticated.']", True),
                         ("[{'error': 'User not authenticated.'}]", True), ("[]", False), ("['a', 'Error']", False),
                         ('{"id": 6}', False), ("[1, 2", False)):
        assert bfcl.failed_result(text) == failed, text
    t = bfcl.load_tasks("bfcl:multi_turn_base:1")[0]
    t.calls = [[("create_ticket", {"title": "Printer"})], t.calls[1]]     # a ground truth that leaves priority out
    e = bfcl.Env(None, max_steps=8)
    e.reset(t)
    assert bfcl.with_defaults(e.truth.methods["create_ticket"], {"title": "a"}) == {"title": "a", "priority": 1}
    assert e.contribution("create_ticket", {"title": "Printer", "priority": 3}) == 0.0
    assert e.contribution("create_ticket", {"title": "Printer", "priority": 1}) == 1.0   # the default, spelt out


def test_ground_truth_calls_are_read_as_literals_never_run():
    assert bfcl.parse_call("mv(source='a', destination='b')") == ("mv", [], {"source": "a", "destination": "b"})
    assert bfcl.parse_call("sort('f.txt')") == ("sort", ["f.txt"], {})
    for code in ("f(x=__import__('os').system('true'))", "os.system('true')", "f(x=y)", "f()[0]", "1 + 1"):
        with pytest.raises(ValueError):
            bfcl.parse_call(code)


def test_step_rewards_succ_calling_contribution_by_the_turns_truth_and_is_solved(fake):
    t = bfcl.load_tasks("bfcl:multi_turn_base:1")[0]
    e = play(t, [[("get_ticket", {"ticket_id": 1}), ("create_ticket", {"title": "Printer", "priority": 2}),
                  ("create_ticket", {"title": "Printer", "priority": 2})], [("get_ticket", {"ticket_id": 6})]])
    # a failed call; the truth's call (once); the same call again (no contribution, and the state now differs)
    assert [getattr(s, "contribution") for s in e.traj.steps] == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    r = reward.step_rewards(t, e.traj)
    assert r[:3] == [0.0, 1.0, 0.5] and r[-1] == reward.is_solved(t, e.traj) == 0.0
    good = expert(t)
    assert reward.step_rewards(t, good.traj) == [1.0, 0.5, 1.0, 1.0]        # a passing turn's Finish earns its contribution


def test_a_runs_recorded_evaluation_is_scored_again_by_replaying_its_calls(fake, tmp_path):
    from harness import launch
    t1, t2 = bfcl.load_tasks("bfcl:multi_turn_base:2")
    good, half = expert(t1), play(t2, [[("create_ticket", {"title": "Router", "priority": 2})], []])
    half.traj.steps[0].observation = '{"id": 7}'                           # the run saw another response
    each = [{"group": t.group, "query_id": str(t.query_id), "pass": 0.0} for t in (t1, t2)]
    path = str(tmp_path / "eval_trajectories.jsonl.gz")
    launch.write_trajectories(path, 3, each, [good.traj, half.traj])
    assert bfcl.rescore(path) == {("multi_turn_base", t1.query_id): (1.0, True, False),
                                  ("multi_turn_base", t2.query_id): (0.0, True, True)}   # one of two turns passes


def test_steptool_and_eval_run_on_bfcl_tasks_end_to_end(fake, small_model, tmp_path):
    (wheel, digest), cache = fake
    # the pin comes from the environment of these subprocesses: the harness reads it at import
    code = ("import sys, runpy; from harness import bfcl; bfcl.WHEEL, bfcl.SHA256 = sys.argv.pop(1), sys.argv.pop(1); "
            "sys.argv[0] = sys.argv.pop(1); runpy.run_path(sys.argv[0], run_name='__main__')")
    envs = {**os.environ, "STEPTOOL_CACHE": cache, "PYTHONPATH": ROOT}
    run = lambda script, *args: subprocess.run([sys.executable, "-c", code, wheel, digest, os.path.join(ROOT, script), *args],
                                               cwd=ROOT, env=envs, capture_output=True, text=True, timeout=600)
    out = str(tmp_path / "run")
    r = run("steptool.py", "--model", small_model, "--tasks", "bfcl:multi_turn/train", "--eval-tasks",
            "bfcl:multi_turn_base/test", "--quick", "--max-steps", "3", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    each = json.load(open(os.path.join(out, "eval_tasks.json")))
    assert each["benchmark"].startswith("BFCL v4 multi_turn_base/test") and {t["group"] for t in each["tasks"]} == {"multi_turn_base"}
    r = run("eval.py", "--model", small_model, "--tasks", "bfcl:multi_turn_base:2", "--max-steps", "3",
            "--max-new-tokens", "8", "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "eval" / "results.json"))
    assert sum(m["n"] for m in res["files"].values()) == 2 and res["benchmark"].startswith("BFCL v4 multi_turn_base:2")


# ---- the real data, where a run fetched it --------------------------------------------------------
REAL = os.path.join(C.cache_dir(), "bfcl-eval-" + bfcl.SHA256[:16])
needs_real = pytest.mark.skipif(not os.path.isfile(os.path.join(REAL, "source.json")),
                                reason="BFCL's wheel is not in the cache (python -m harness.bfcl fetches it)")


@needs_real
def test_on_bfcls_800_entries_ground_truth_passes_all_and_an_empty_policy_none():
    for cat in bfcl.CATEGORIES:
        tasks = bfcl.load_tasks("bfcl:" + cat)
        assert len(tasks) == 200
        assert sum(reward.is_solved(t, expert(t).traj) == 1.0 for t in tasks) == 200, cat
        assert sum(reward.is_solved(t, play(t, [[]] * len(t.turns)).traj) > 0 for t in tasks) == 0, cat


CHECKER = """
import json, sys
sys.path.insert(0, sys.argv[1])                 # the wheel itself: BFCL's own checker, nothing installed
from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker
cases = json.load(sys.stdin)
print(json.dumps([multi_turn_checker(c["model"], c["truth"], c["entry"], c["entry"]["id"].rsplit("_", 1)[0],
                                     f"case{i}")["valid"] for i, c in enumerate(cases)]))
"""


@needs_real
def test_our_verdicts_equal_bfcls_own_checker_on_varied_policies():
    """Per entry of a sample: the ground truth, its last call of a turn dropped, an argument changed, a call added,
    nothing; each played through our env and given to BFCL's multi_turn_checker as call strings."""
    wheel = next(os.path.join(REAL, f) for f in os.listdir(REAL) if f.endswith(".whl"))
    cases, ours = [], []
    for cat in bfcl.CATEGORIES:
        for t in bfcl.load_tasks(f"bfcl:{cat}")[::20]:
            per_turn, cur = [], []
            for s in t.expert:
                if s["name"] == "Finish":
                    per_turn.append(cur); cur = []
                else:
                    cur.append((s["name"], dict(s["arguments"])))
            k = max(range(len(per_turn)), key=lambda i: len(per_turn[i]))
            dropped = [c[:-1] if i == k else c for i, c in enumerate(per_turn)]
            changed = [[(n, {a: (v + 1 if isinstance(v, (int, float)) and not isinstance(v, bool) else
                               v + "x" if isinstance(v, str) else v) for a, v in args.items()}) if i == k and j == 0 else (n, args)
                        for j, (n, args) in enumerate(c)] for i, c in enumerate(per_turn)]
            extra = [c + [c[0]] if i == k and c else c for i, c in enumerate(per_turn)]
            for policy in (per_turn, dropped, changed, extra, [[] for _ in per_turn]):
                e = play(t, policy)
                ours.append(reward.is_solved(t, e.traj) == 1.0)
                calls = [[[f"{n}({', '.join(f'{a}={v!r}' for a, v in args.items())})"] for n, args in c] for c in policy]
                cases.append({"model": calls, "truth": t.truth, "entry": t.entry})
    r = subprocess.run([sys.executable, "-c", CHECKER, wheel], input=json.dumps(cases), capture_output=True, text=True,
                       timeout=600, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(ours) == len(theirs) > 100 and sum(ours) > 0 and sum(not x for x in ours) > 0
    disagree = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not disagree, [(cases[i]["entry"]["id"], ours[i], theirs[i]) for i in disagree[:5]]
