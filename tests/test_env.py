"""The tool world seen by the policy: the embedded benchmark (world.py), tasks, actions, ToolEnv,
ToolClient (env.py). Expert trajectories must solve their tasks through the real server; every
malformed turn, task file and dead server must fail in a way a training run can read.
"""
import json
from dataclasses import asdict
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, SHARED, STB_QUERIES
import env
import reward
from harness import formats
from harness import toolclient
from harness import world


# ---- the embedded benchmark ------------------------------------------------------------------
def test_every_test_split_expert_trajectory_solves_its_task_through_env_and_server(tool_server, test_tasks):
    client = toolclient.ToolClient(tool_server.url, retries=0)
    client.check()
    assert len(test_tasks) == 360
    for task in test_tasks:
        e = env.ToolEnv(client, max_steps=len(task.expert))
        e.reset(task)
        for s in task.expert:
            obs, done, step = e.step(env.format_action(s["thought"], s["name"], s["arguments"]))
            assert step.error == "" and (step.record is None or step.record["error"] == ""), (task.query_id, step)
            assert "message" not in (step.record or {}).get("response", {}), (task.query_id, step)  # no API failure
        assert e.done and e.traj.end == "finish" and e.traj.finish == "give_answer", task.query_id
        missing = [a for a in task.answer if a not in e.traj.final_answer]
        assert task.answer and not missing, (task.query_id, missing)


def test_benchmark_has_at_least_5_categories_and_25_apis():
    assert len({cat for cat, *_ in world.APIS}) >= 5
    assert len(world.APIS) >= 25
    assert len({(tool.lower(), api) for _, tool, api, *_ in world.APIS}) == len(world.APIS)  # no duplicates


def test_splits_have_at_least_1000_train_and_300_test_tasks_in_all_three_groups(train_tasks, test_tasks):
    assert len(train_tasks) >= 1000 and len(test_tasks) >= 300
    for tasks in (train_tasks, test_tasks):
        assert {t.group for t in tasks} == {"G1", "G2", "G3"}
        assert len({t.query for t in tasks}) == len(tasks)  # no repeated query


def test_each_task_offers_5_to_10_functions_including_all_relevant_ones(train_tasks, test_tasks):
    for t in train_tasks + test_tasks:
        names = [f["name"] for f in t.functions]
        assert 5 <= len(names) <= 10 and len(set(names)) == len(names), t.query_id
        assert set(t.relevant) <= set(names), t.query_id
        assert [s["name"] for s in t.expert[:-1]] and set(s["name"] for s in t.expert[:-1]) == set(t.relevant)
        assert t.expert[-1]["name"] == "Finish"


def test_g1_uses_one_api_g2_two_or_three_of_one_category_g3_three_to_five_across_categories(train_tasks, test_tasks):
    for t in train_tasks + test_tasks:
        cats = {t.api[n][0] for n in t.relevant}
        if t.group == "G1":
            assert len(t.relevant) == 1, t.query_id
        elif t.group == "G2":
            assert 2 <= len(t.relevant) <= 3 and len(cats) == 1, t.query_id
        else:
            assert 3 <= len(t.relevant) <= 5 and len(cats) >= 2, t.query_id


def test_g3_tasks_chain_a_value_from_an_earlier_response_into_a_later_call(test_tasks, train_tasks):
    w = world.World()
    for t in train_tasks + test_tasks:
        if t.group != "G3":
            continue
        seen, chained = [], False
        for s in t.expert[:-1]:
            _, tool, api = t.api[s["name"]]
            chained |= any(str(v) in r and str(v) not in t.query for v in s["arguments"].values() for r in seen)
            seen.append(json.dumps(world.call_api(w, tool, api, s["arguments"])["response"]))
        assert chained, (t.query_id, t.query)


def test_each_split_has_entities_of_its_own():
    split = world.World().split
    for kind, d in split.items():
        names = {sp: {n.lower() for n in d[sp]} for sp in world.SPLIT_NAMES}
        assert all(names.values()), kind
        for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
            assert not names[a] & names[b], (kind, a, b)


def generated_ids(w, split):
    """Every id the world can hand out in a split, by kind: restaurants, artists, teams, books (owned ids), the
    trains of every pair of its cities, the booking codes of every party size at its restaurants, ticker symbols."""
    cities = w.split["city"][split]
    out = {k: {i for o, i in w.ids.items() if o[0] == k and o[1] in w.split["city" if k == "restaurant" else k][split]}
           for k in ("restaurant", "artist", "team", "book")}
    out["train"] = {t["train_id"] for a in cities for b in cities if a != b for t in w.trains(a, b)}
    out["booking"] = {world.call_api(w, "DineSpot", "book_table", {"restaurant_id": i, "people": n})["response"]["booking_code"]
                      for i in out["restaurant"] for n in range(1, 13)}
    out["symbol"] = {world._symbol(c) for c in w.split["company"][split]}
    return out


def test_no_generated_id_is_shared_by_two_splits_and_each_id_has_one_owner():
    w = world.World()
    ids = {sp: generated_ids(w, sp) for sp in world.SPLIT_NAMES}
    for kind in ids["train"]:
        for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
            assert ids[a][kind] and ids[b][kind] and not ids[a][kind] & ids[b][kind], (kind, a, b)
    assert len(w.by_id) == len(w.ids)  # no id names two owners (a lookup returning another split's entity)
    # the lookups answer with the entity of the id's own split
    for sp in world.SPLIT_NAMES:
        for rid in ids[sp]["restaurant"]:
            assert w.split_of("city", w.owner("restaurant", rid)[1]) == sp


def test_no_query_and_no_expert_call_is_shared_by_two_splits(train_tasks, val_tasks, test_tasks):
    splits = {"train": train_tasks, "validation": val_tasks, "test": test_tasks}
    queries = {sp: {t.query.lower() for t in ts} for sp, ts in splits.items()}
    calls = {sp: {(s["name"], json.dumps(s["arguments"], sort_keys=True)) for t in ts for s in t.expert[:-1]}
             for sp, ts in splits.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not queries[a] & queries[b] and not calls[a] & calls[b], (a, b)


def test_no_answer_fact_can_be_read_off_its_query(train_tasks, val_tasks, test_tasks):
    shown = [(t.query_id, a) for t in train_tasks + val_tasks + test_tasks for a in t.answer if reward.mentions(t.query, a)]
    assert not shown, shown[:5]


def test_validation_split_has_40_tasks_per_group_and_every_file_names_its_version(val_tasks):
    assert {g: sum(t.group == g for t in val_tasks) for g in ("G1", "G2", "G3")} == {"G1": 40, "G2": 40, "G3": 40}
    for name in world.FILES.values():
        assert formats.benchmark(os.path.join(ROOT, "data", name)) == world.VERSION == "embedded v2"


def test_no_test_query_mentions_a_train_entity_name_even_inside_another_name(val_tasks, test_tasks):
    split = world.World().split  # all kinds: cities, artists, teams, books, companies, people, ...
    train_only = [n for d in split.values() for n in set(d["train"]) - set(d["test"])]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, train_only)) + r")\b", re.I)
    leaks = [(t.query_id, m.group(0)) for t in val_tasks + test_tasks for m in [pattern.search(t.query)] if m]
    assert not leaks, leaks[:5]
    # the pattern is not vacuous: train queries do mention train entities
    assert pattern.search(world.World().split["city"]["train"][0])


def test_regenerating_the_benchmark_gives_the_committed_files_byte_for_byte(tmp_path):
    # A subprocess with another hash seed: nothing may depend on Python's str hashing.
    subprocess.run([sys.executable, "-m", "harness.world", "--out", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "PYTHONHASHSEED": "4321"})
    for name in world.FILES.values():
        with open(os.path.join(ROOT, "data", name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name


def test_make_tasks_is_deterministic_in_process(test_tasks):
    w, seen = world.World(), set()
    for split in ("train", "validation"):  # the splits made before test: none of their queries is made again
        world.make_tasks(w, split, *world.SPLITS[split], seen)
    tasks = world.make_tasks(w, "test", *world.SPLITS["test"], seen)
    assert [(t["query_id"], t["query"], t["functions"], t["answer"]) for t in tasks] == \
           [(t.query_id, t.query, [f["name"] for f in t.functions], t.answer) for t in test_tasks]


# ---- ToolBench's names and StableToolBench query files ------------------------------------
@pytest.mark.parametrize("tool, api, name", [
    ("TheClique", "Transfermarkt search", "transfermarkt_search_for_theclique"),
    ("Quill Lookup", "id", "is_id_for_quill_lookup"),                         # reserved word
    ("Quill Lookup", "From", "is_from_for_quill_lookup"),                     # reserved after lower-casing
    ("Orbit Weather API", "3-Day Forecast", "get_3_day_forecast_for_orbit_weather_api"),  # leading digit
    ("Kick.com API | Kick API", "Get Channel Clips", "get_channel_clips_for_kick_com_api_kick_api"),
    ("Crypto Symbols", "/v1/cryptosymbols", "v1_cryptosymbols_for_crypto_symbols"),
    ("x" * 40, "y" * 40, ("y" * 40 + "_for_" + "x" * 40)[-64:]),              # the last 64 characters
])
def test_function_names_follow_toolbench_convention(tool, api, name):
    assert env.function_name(tool, api) == name


def test_load_tasks_reads_stabletoolbench_query_files():
    tasks = formats.load_tasks(STB_QUERIES)
    assert [t.query_id for t in tasks] == [9101, 9102, 9103]
    assert {t.group for t in tasks} == {"stb_queries"}  # the file stem, as for G1_instruction.json
    t = tasks[1]
    assert t.relevant == ["is_id_for_quill_lookup", "v2_entries_search_for_quill_lookup"]
    assert t.api == {"is_id_for_quill_lookup": ["Business Software", "Quill Lookup", "id"],
                     "v2_entries_search_for_quill_lookup": ["Business Software", "Quill Lookup", "/v2/entries/search"]}
    search = t.functions[1]["parameters"]  # parameter names and types as ToolBench shows them
    assert search["required"] == ["is_from"] and search["optional"] == ["pagesize", "include_drafts"]
    assert [search["properties"][p]["type"] for p in ("is_from", "pagesize", "include_drafts")] == ["string", "integer", "boolean"]
    assert tasks[0].functions[2]["name"] == "pollen_count_for_orbit_weather_api" and tasks[0].answer == []


def test_a_group_field_in_a_query_overrides_the_file_stem(tmp_path):
    with open(STB_QUERIES) as f:
        q = json.load(f)[0]
    path = tmp_path / "G1_instruction.json"
    path.write_text(json.dumps([q, {**q, "query_id": 1, "group": "G3_instruction"}]))
    assert [t.group for t in formats.load_tasks(str(path))] == ["G1_instruction", "G3_instruction"]


def _malformed(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(formats.TaskFileError) as e:
        formats.load_tasks(str(path))
    assert str(path) in str(e.value)
    return str(e.value)


def test_malformed_task_files_raise_task_file_error_naming_file_and_item(tmp_path):
    with open(STB_QUERIES) as f:
        good = json.load(f)
    _malformed(tmp_path, "broken.json", '[{"query_id": 1, "query": ')
    _malformed(tmp_path, "binary.json", b"\xff\xfe\x00garbage")
    _malformed(tmp_path, "scalar.json", "42")
    _malformed(tmp_path, "empty.json", "")
    msg = _malformed(tmp_path, "no_api_list.json", json.dumps([good[0], {"query_id": 777, "query": "q"}]))
    assert "item 1" in msg and "777" in msg and "api_list" in msg
    msg = _malformed(tmp_path, "bad_api.json", json.dumps([{**good[2], "api_list": [{"tool_name": "t"}]}]))
    assert "item 0" in msg and "9103" in msg
    msg = _malformed(tmp_path, "bad_relevant.json", json.dumps([{**good[0], "relevant APIs": [["only tool"]]}]))
    assert "item 0" in msg and "9101" in msg
    with pytest.raises(formats.TaskFileError, match="nowhere.json"):
        formats.load_tasks(str(tmp_path / "nowhere.json"))


# ---- actions: parse_action ----------------------------------------------------------------
CALL = {"city": "Velmora"}


@pytest.mark.parametrize("text, name, arguments, thought", [
    ('Thought: check the sky\nAction: forecast_for_skycast\nAction Input: {"city": "Velmora"}',
     "forecast_for_skycast", CALL, "check the sky"),
    ('  Thought :   check the sky  \n\n   Action :   forecast_for_skycast   \n  Action Input :  \n {"city" : "Velmora"}  \n',
     "forecast_for_skycast", CALL, "check the sky"),
    ('Thought: check the sky\n```\nAction: forecast_for_skycast\nAction Input: ```json\n{"city": "Velmora"}\n```',
     "forecast_for_skycast", CALL, "check the sky"),
    ('Action: forecast_for_skycast\nAction Input: {"city": "Velmora"}', "forecast_for_skycast", CALL, ""),
    ('Thought: t\nAction: forecast_for_skycast\nAction Input: {"city": "Velmora"}\nObservation: sunny {"a": 1}',
     "forecast_for_skycast", CALL, "t"),
    ("Thought: t\nAction: forecast_for_skycast\nAction Input: {'city': 'Velmora', 'days': None, 'hourly': True}",
     "forecast_for_skycast", {"city": "Velmora", "days": None, "hourly": True}, "t"),
    ("Thought: t\nAction: forecast_for_skycast\nAction Input: {'city': 'Velmora'} then {'more': 1}",
     "forecast_for_skycast", CALL, "t"),
    ("Thought: t\nAction: forecast_for_skycast\nAction Input: {'pair': (1, 2), 3: 'x'}",
     "forecast_for_skycast", {"pair": [1, 2], "3": "x"}, "t"),      # made JSON: tuple -> list, key -> str
    ("Thought: t\nAction: forecast_for_skycast\nAction Input:", "forecast_for_skycast", {}, "t"),
    ("Thought: t\nAction: forecast_for_skycast", "forecast_for_skycast", {}, "t"),
    ('thought: t\naction: forecast_for_skycast\naction input: {"city": "Velmora"}', "forecast_for_skycast", CALL, "t"),
    ('Thought: t\nAction: `forecast_for_skycast`\nAction Input: \'{"city": "Velmora"}\'', "forecast_for_skycast", CALL, "t"),
], ids=["canonical", "extra-whitespace", "code-fences", "no-thought", "trailing-text", "python-literal",
        "python-literal-then-text", "python-tuple-and-int-key", "empty-input", "no-input-line", "lowercase",
        "quoted-name-and-input"])
def test_parse_action_reads_a_well_meant_turn(text, name, arguments, thought):
    a = env.parse_action(text)
    assert (a.error, a.name, a.arguments, a.thought) == ("", name, arguments, thought)
    json.dumps(a.arguments)  # always JSON-serializable


@pytest.mark.parametrize("text, name, error", [
    ('Thought: t\nAction: forecast_for_skycast\nAction Input: ["Velmora"]', "forecast_for_skycast", "must be a JSON object"),
    ('Thought: t\nAction: forecast_for_skycast\nAction Input: [{"city": "Velmora"}]', "forecast_for_skycast", "must be a JSON object"),
    ('Thought: t\nAction: forecast_for_skycast\nAction Input: "Velmora"', "forecast_for_skycast", "must be a JSON object"),
    ("Thought: t\nAction: forecast_for_skycast\nAction Input: 42", "forecast_for_skycast", "must be a JSON object"),
    ("Thought: t\nAction: forecast_for_skycast\nAction Input: city=Velmora", "forecast_for_skycast", "not valid JSON"),
    ("Thought: t\nAction: forecast_for_skycast\nAction Input: {'city': {1, 2}}", "forecast_for_skycast", "JSON cannot carry"),
    ("Thought: t\nAction: forecast_for_skycast\nAction Input: {[1]: 2}", "forecast_for_skycast", "not valid JSON"),
    ("Thought: t\nAction: forecast_for_skycast\nAction Input: " + "[" * 50_000, "forecast_for_skycast", "not valid JSON"),
    ('Thought: t\nAction: forecast_for_skycast\nAction Input: {"a": ' + "[" * 50_000, "forecast_for_skycast", "not valid JSON"),
    ("Thought: t\nAction Input: {}", "", "no 'Action:' line"),
    ("The weather is nice today.", "", "no 'Action:' line"),
    ('Thought: t\nAction:\nAction Input: {"city": "Velmora"}', "", "names no function"),
], ids=["list", "list-of-object", "string", "number", "not-json", "python-set", "unhashable-key",
        "nested-too-deep", "nested-too-deep-in-object", "no-action-line", "prose", "empty-action"])
def test_parse_action_turns_a_malformed_turn_into_an_error_not_an_exception(text, name, error):
    a = env.parse_action(text)
    assert a.name == name and a.arguments == {} and error in a.error


def test_format_action_parses_back_to_the_same_action():
    text = env.format_action("why", "forecast_for_skycast", {"city": "Velmora", "n": [1, {"x": None}]})
    a = env.parse_action(text)
    assert (a.thought, a.name, a.arguments, a.error) == ("why", "forecast_for_skycast", {"city": "Velmora", "n": [1, {"x": None}]}, "")


# ---- ToolEnv -------------------------------------------------------------------------------
class FakeClient:
    """Records each call and answers it with a fixed response."""

    def __init__(self, response="sunny"):
        self.calls, self.response = [], response

    def call(self, category, tool_name, api_name, arguments):
        self.calls.append((category, tool_name, api_name, arguments))
        return {"error": "", "response": self.response}


def fake_task():
    fn = lambda name, desc: {"name": name, "description": desc,
                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    return env.Task(7, "What is the weather in Velmora?", [fn("forecast_for_skycast", "Weather."), fn("air_quality_for_skycast", "Air.")],
                    ["forecast_for_skycast"], "G1",
                    {"forecast_for_skycast": ["Weather", "SkyCast", "forecast"], "air_quality_for_skycast": ["Weather", "SkyCast", "air_quality"]},
                    ["sunny"])


def act(name, **arguments):
    return env.format_action("thinking", name, arguments)


def test_reset_renders_offered_functions_and_finish_then_the_query():
    e = env.ToolEnv(FakeClient())
    messages = e.reset(fake_task())
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "forecast_for_skycast(city: string) - Weather." in messages[0]["content"]
    assert "air_quality_for_skycast(" in messages[0]["content"] and "\nFinish(" in messages[0]["content"]
    assert messages[1]["content"] == "What is the weather in Velmora?"


def test_an_offered_call_reaches_the_server_under_its_category_tool_and_api_names():
    client = FakeClient()
    e = env.ToolEnv(client)
    e.reset(fake_task())
    obs, done, step = e.step(act("forecast_for_skycast", city="Velmora"))
    assert client.calls == [("Weather", "SkyCast", "forecast", {"city": "Velmora"})]
    assert not done and step.record == {"error": "", "response": "sunny"} and json.loads(obs) == step.record
    assert [m["role"] for m in e.messages[2:]] == ["assistant", "function"] and e.messages[-1]["content"] == obs


@pytest.mark.parametrize("text, error", [
    (act("weather_alerts_for_skycast", city="Velmora"), "No such function name: weather_alerts_for_skycast"),
    ("I will just guess.", "Parse error"),
    (act("Finish", return_type="maybe"), "return_type"),
    (act("Finish", final_answer="sunny"), "return_type"),
], ids=["unknown-function", "unparseable", "finish-bad-return-type", "finish-no-return-type"])
def test_a_bad_turn_becomes_an_error_observation_and_the_episode_goes_on(text, error):
    client = FakeClient()
    e = env.ToolEnv(client, observation_role="user")
    e.reset(fake_task())
    obs, done, step = e.step(text)
    assert not done and client.calls == [] and step.record is None
    assert error in step.error and json.loads(obs) == {"error": step.error, "response": ""}
    assert e.messages[-1] == {"role": "user", "content": obs}
    obs, done, step = e.step(act("forecast_for_skycast", city="Velmora"))  # the episode goes on
    assert not done and step.error == "" and len(client.calls) == 1


def test_finish_give_answer_ends_the_episode_with_the_answer():
    e = env.ToolEnv(FakeClient())
    e.reset(fake_task())
    e.step(act("forecast_for_skycast", city="Velmora"))
    obs, done, step = e.step(act("Finish", return_type="give_answer", final_answer="It is sunny."))
    assert done and obs == "" and step.record is None
    assert (e.traj.finish, e.traj.final_answer, e.traj.end, len(e.traj.steps)) == ("give_answer", "It is sunny.", "finish", 2)
    assert e.messages[-1]["role"] == "assistant"  # nothing follows the last turn
    with pytest.raises(AssertionError):
        e.step(act("forecast_for_skycast", city="Velmora"))


def test_finish_give_up_and_restart_ends_the_episode_as_given_up():
    e = env.ToolEnv(FakeClient())
    e.reset(fake_task())
    _, done, _ = e.step(act("Finish", return_type="give_up_and_restart"))
    assert done and (e.traj.finish, e.traj.final_answer, e.traj.end) == ("give_up", "", "finish")


def test_max_steps_ends_the_episode():
    e = env.ToolEnv(FakeClient(), max_steps=3)
    e.reset(fake_task())
    dones = [e.step(act("forecast_for_skycast", city="Velmora"))[1] for _ in range(3)]
    assert dones == [False, False, True]
    assert (e.traj.end, e.traj.finish, len(e.traj.steps)) == ("max_steps", "", 3)


def test_observations_are_truncated_to_obs_chars():
    long = "x" * 5000
    e = env.ToolEnv(FakeClient(response=long), obs_chars=100)
    e.reset(fake_task())
    obs, _, step = e.step(act("forecast_for_skycast", city="Velmora"))
    assert len(obs) == 100 and json.dumps(step.record).startswith(obs)
    assert step.record["response"] == long  # the raw record is kept whole
    e = env.ToolEnv(FakeClient(response="short"), obs_chars=100)
    e.reset(fake_task())
    assert json.loads(e.step(act("forecast_for_skycast", city="Velmora"))[0])["response"] == "short"


def test_a_trajectory_round_trips_through_a_dict():
    e = env.ToolEnv(FakeClient())
    e.reset(fake_task())
    e.step("no action here")
    e.step(act("forecast_for_skycast", city="Velmora"))
    e.step(act("Finish", return_type="give_answer", final_answer="sunny"))
    d = json.loads(json.dumps(asdict(e.traj)))
    assert formats.trajectory(d) == e.traj


def test_step_all_steps_many_episodes_against_the_real_server(tool_server, test_tasks):
    client = toolclient.ToolClient(tool_server.url, retries=0)
    tasks = test_tasks[:4]
    envs = [env.ToolEnv(client) for _ in tasks]
    for e, t in zip(envs, tasks):
        e.reset(t)
    first = [env.format_action(t.expert[0]["thought"], t.expert[0]["name"], t.expert[0]["arguments"]) for t in tasks]
    out = env.step_all(client, envs, first)
    assert [step.name for _, _, step in out] == [t.expert[0]["name"] for t in tasks]
    assert all(step.record["error"] == "" and "message" not in step.record["response"] for _, _, step in out)


# ---- ToolClient ------------------------------------------------------------------------------
@contextmanager
def stub_server(statuses):
    """A tiny HTTP server answering POSTs with the given statuses in turn (then 200 forever)."""
    seen = []

    class Stub(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status = statuses[len(seen) - 1] if len(seen) <= len(statuses) else 200
            data = json.dumps({"error": "", "response": "ok"} if status == 200 else {"error": "boom"}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


def dead_url():
    """The address of a loopback port that nobody listens on."""
    with stub_server([]) as (url, _):
        pass
    return url


def test_a_dead_server_raises_tool_server_error_naming_the_url_quickly():
    url = dead_url()
    client = toolclient.ToolClient(url, timeout=1, retries=2, backoff=0.01)
    t0 = time.perf_counter()
    with pytest.raises(toolclient.ToolServerError, match=re.escape(url)):
        client.call("Weather", "SkyCast", "forecast", CALL)
    with pytest.raises(toolclient.ToolServerError, match=re.escape(url)):
        client.check()
    assert time.perf_counter() - t0 < 5


def test_5xx_answers_are_retried_until_one_succeeds():
    with stub_server([503, 502]) as (url, seen):
        record = toolclient.ToolClient(url, retries=3, backoff=0.01).call("Weather", "SkyCast", "forecast", CALL)
    assert record == {"error": "", "response": "ok"} and len(seen) == 3
    assert seen[0] == {"category": "Weather", "tool_name": "SkyCast", "api_name": "forecast",
                       "tool_input": json.dumps(CALL), "strip": "", "toolbench_key": ""}  # the protocol's body


def test_5xx_forever_raises_after_the_last_retry():
    with stub_server([500] * 10) as (url, seen):
        with pytest.raises(toolclient.ToolServerError, match="HTTP 500"):
            toolclient.ToolClient(url, retries=2, backoff=0.01).call("Weather", "SkyCast", "forecast", CALL)
    assert len(seen) == 3


def test_4xx_is_an_error_record_not_retried():
    with stub_server([400]) as (url, seen):
        record = toolclient.ToolClient(url, retries=3, backoff=0.01).call("Weather", "SkyCast", "forecast", CALL)
    assert "HTTP 400" in record["error"] and len(seen) == 1


def test_a_loopback_server_is_reached_even_when_a_proxy_is_configured(tool_server, monkeypatch):
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(var, dead_url())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = toolclient.ToolClient(tool_server.url, retries=0)
    client.check()
    assert client.call("Weather", "SkyCast", "forecast", {"city": "Nowhere"})["response"]["status"] == 404


# ---- command line and StableToolBench's own samples ----------------------------------------
def test_the_task_file_command_line_renders_prompts():
    out = subprocess.run([sys.executable, "-m", "harness.formats", "--tasks", STB_QUERIES, "--show", "3"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.count("<system>") == 3 and "is_id_for_quill_lookup(is_id: integer)" in out
    assert "v2_entries_search_for_quill_lookup(is_from: string, pagesize?: integer, include_drafts?: boolean)" in out


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared (reference data) is not present")
def test_stabletoolbench_sample_prompts_render():
    path = os.path.join(SHARED, "data", "stabletoolbench", "sample_queries.json")
    tasks = formats.load_tasks(path)
    assert len(tasks) == 12 and {t.group for t in tasks} == {"G1_instruction", "G2_instruction", "G3_instruction"}
    for t in tasks:
        system, user = env.initial_messages(t)
        assert user == {"role": "user", "content": t.query}
        for f in t.functions:
            assert f"\n{f['name']}(" in system["content"]
        assert set(t.relevant) <= set(t.api)
