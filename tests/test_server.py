"""The tool server (server.py): StableToolBench's "virtual" protocol over real loopback HTTP.

Every bad request gets its answer and the next request, on a new connection, is still served;
the three backends (embedded world, response cache, simulated from query files) answer in order;
a cache file that cannot be used is an error record naming it, never a 5xx or "API not found";
names from requests never reach the file system unstandardized and are never imported; idle,
slow, resetting and surplus clients cost a bounded time and no handler thread for long; bad query
files and cache folders are refused before the server listens.
"""
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from conftest import ROOT, SHARED, STB_QUERIES
import env
from harness import formats
from harness import toolclient
from harness import server
from harness import world

W = world.World()
CITY = W.split["city"]["test"][0]  # an entity every test can use


@pytest.fixture
def serve():
    """Start extra servers (with a cache or query files) that stop when the test ends."""
    started = []

    def start(**kw):
        started.append(server.start_in_thread(port=0, **kw))
        return started[-1]
    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def request(url, path="/virtual", body=None, raw=None, method="POST", headers=None):
    """One HTTP request on a fresh connection -> (status, parsed JSON answer)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def call(url, category, tool, api, tool_input):
    body = {"category": category, "tool_name": tool, "api_name": api, "tool_input": tool_input,
            "strip": "", "toolbench_key": ""}
    return request(url, body=body)


def direct(tool, api, args):
    """What the embedded world answers without HTTP, as it looks after a JSON round trip."""
    return json.loads(json.dumps(world.call_api(W, tool, api, args)))


def assert_still_serves(url):
    status, record = call(url, "Weather", "SkyCast", "forecast", json.dumps({"city": CITY}))
    assert status == 200 and record == direct("SkyCast", "forecast", {"city": CITY})


# ---- the embedded benchmark over HTTP -------------------------------------------------------
def test_health_route_answers_ok(tool_server):
    assert request(tool_server.url, "/health", method="GET") == (200, {"status": "ok"})


@pytest.mark.parametrize("tool, api, args", [
    ("SkyCast", "forecast", {"city": CITY}),
    ("RailNet", "find_trains", {"origin": CITY, "destination": W.split["city"]["test"][1]}),
    ("DineSpot", "book_table", {"restaurant_id": W.restaurant(CITY, 0)["restaurant_id"], "people": 4}),
    ("SkyCast", "forecast", {"city": "Atlantis"}),  # an API's own failure: inside the response
    ("SkyCast", "forecast", {}),                    # a missing parameter: inside the response too
])
def test_embedded_api_answers_exactly_what_world_call_api_answers(tool_server, tool, api, args):
    cat = world.API[(tool.lower(), api)][0]
    status, record = call(tool_server.url, cat, tool, api, json.dumps(args))
    assert status == 200 and record == direct(tool, api, args)
    assert record["error"] == ""


@pytest.mark.parametrize("category, tool, api", [
    ("Weather", "SkyCast", "forecast"),               # raw names
    ("weather", "skycast", "forecast"),               # standardized
    ("Weather", "SkyCast", "forecast_for_skycast"),   # the model-facing function name as api_name
    ("Weather", "skycast_for_weather", "forecast"),   # StableToolBench's `<tool>_for_<category>` tool name
    ("Weather", "SKYCAST", "Forecast"),
])
def test_every_spelling_of_a_name_reaches_the_same_api(tool_server, category, tool, api):
    status, record = call(tool_server.url, category, tool, api, json.dumps({"city": CITY}))
    assert status == 200 and record == direct("SkyCast", "forecast", {"city": CITY})
    assert record["response"]["city"] == CITY


def test_tool_input_may_be_an_object_or_empty_text(tool_server):
    as_object = call(tool_server.url, "Weather", "SkyCast", "forecast", {"city": CITY})
    assert as_object == (200, direct("SkyCast", "forecast", {"city": CITY}))
    empty = call(tool_server.url, "Weather", "SkyCast", "forecast", "")
    assert empty == (200, direct("SkyCast", "forecast", {}))  # {} -> a missing-parameter response
    assert "Missing required parameter 'city'" in empty[1]["response"]["message"]


# ---- each bad input gets its answer, and the server serves the next request -----------------
def test_malformed_json_body_is_400_and_the_server_serves_the_next_request(tool_server):
    status, record = request(tool_server.url, raw=b'{"category": "Weather", "tool_name": ')
    assert status == 400 and "malformed JSON" in record["error"]
    assert_still_serves(tool_server.url)


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"null", b"\xff\xfe not utf-8", b"[" * 100_000],
                         ids=["list", "string", "null", "bad-utf8", "nested-too-deep"])
def test_body_that_is_not_a_json_object_is_400(tool_server, raw):
    status, record = request(tool_server.url, raw=raw)
    assert status == 400 and record["error"] and record["response"] == ""
    assert_still_serves(tool_server.url)


def test_missing_fields_are_400_and_the_error_names_each_of_them(tool_server):
    status, record = request(tool_server.url, body={"category": "Weather", "tool_name": "SkyCast"})
    assert status == 400
    assert "api_name" in record["error"] and "tool_input" in record["error"]
    assert "category" not in record["error"].split(":", 1)[1]  # present fields are not named
    assert_still_serves(tool_server.url)


def test_names_that_are_not_strings_are_400(tool_server):
    status, record = call(tool_server.url, "Weather", ["SkyCast"], "forecast", "{}")
    assert status == 400 and "string" in record["error"]
    assert_still_serves(tool_server.url)


@pytest.mark.parametrize("tool_input", ["{city: Velmora", "{'city': 'Velmora'}", "[1, 2]", "42", "[" * 100_000],
                         ids=["broken", "python-literal", "list", "number", "nested-too-deep"])
def test_unparseable_tool_input_gets_the_protocols_own_parse_error(tool_server, tool_input):
    status, record = call(tool_server.url, "Weather", "SkyCast", "forecast", tool_input)
    assert status == 200 and record == {"error": "Tool input parse error...\n", "response": ""}
    assert_still_serves(tool_server.url)


def test_body_over_one_mib_is_413_and_the_server_serves_the_next_request(tool_server):
    u = urlsplit(tool_server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.putrequest("POST", "/virtual")
    conn.putheader("Content-Length", str(server.MAX_BODY + 1))  # announced; never sent
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and str(server.MAX_BODY) in json.loads(r.read())["error"]
    conn.close()
    assert_still_serves(tool_server.url)


def test_negative_content_length_is_400_not_a_hang(tool_server):
    u = urlsplit(tool_server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)  # a hang fails as a timeout
    conn.putrequest("POST", "/virtual")
    conn.putheader("Content-Length", "-1")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 400
    conn.close()
    assert_still_serves(tool_server.url)


def test_unknown_api_is_200_with_an_error_naming_it(tool_server):
    status, record = call(tool_server.url, "Weather", "SkyCast", "moon_phase", "{}")
    assert status == 200 and record["response"] == ""
    assert "API not found" in record["error"] and "moon_phase" in record["error"] and "SkyCast" in record["error"]
    assert_still_serves(tool_server.url)


@pytest.mark.parametrize("method, path", [("POST", "/nope"), ("GET", "/virtual"), ("POST", "/virtual/../health")])
def test_wrong_route_is_404(tool_server, method, path):
    body = {"category": "Weather", "tool_name": "SkyCast", "api_name": "forecast", "tool_input": "{}"}
    status, record = request(tool_server.url, path, body=body if method == "POST" else None, method=method)
    assert status == 404 and "no route" in record["error"]
    assert_still_serves(tool_server.url)


def test_a_bug_inside_an_api_is_500_and_the_server_survives(tool_server, monkeypatch):
    def broken(*args):
        raise KeyError("oops")
    monkeypatch.setattr(world, "call_api", broken)
    status, record = call(tool_server.url, "Weather", "SkyCast", "forecast", "{}")
    assert status == 500 and "KeyError" in record["error"]
    monkeypatch.undo()
    assert_still_serves(tool_server.url)


# ---- the response cache backend (StableToolBench layout, read-only) ------------------------
def write_cache(root, category_dir, tool_dir, api_file, records):
    d = root / category_dir / tool_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / api_file).write_text(json.dumps(records))


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "cache"
    write_cache(root, "Data", "quotes_hub_for_Data", "random_quote.json", {
        str({"lang": "en"}): {"error": "", "response": {"quote": "Measure twice."}},
        str({}): {"error": "", "response": "no language given"}})
    write_cache(root, "Business_Software", "quill_lookup_for_Business_Software", "is_id.json", {
        str({"is_id": 42}): {"error": "", "response": {"record": "the cached one"}}})
    server._load_cache_file.cache_clear()
    return root


def test_cache_hit_returns_the_stored_record_for_every_spelling_of_the_names(serve, cache):
    url = serve(cache=str(cache)).url
    hit = {"error": "", "response": {"quote": "Measure twice."}}
    assert call(url, "Data", "Quotes Hub", "Random Quote", '{"lang": "en"}') == (200, hit)
    assert call(url, "Data", "quotes_hub_for_Data", "random_quote_for_quotes_hub", {"lang": "en"}) == (200, hit)
    assert call(url, "Data", "Quotes Hub", "Random Quote", "")[1]["response"] == "no language given"


def test_cache_finds_reserved_api_names_and_multiword_categories_where_stabletoolbench_writes_them(serve, cache):
    url = serve(cache=str(cache)).url  # api "id" lives in is_id.json; "Business Software" in Business_Software/
    for api in ("id", "is_id", "is_id_for_quill_lookup"):
        assert call(url, "Business Software", "Quill Lookup", api, '{"is_id": 42}')[1]["response"] == {"record": "the cached one"}


@pytest.mark.parametrize("category, folder", [
    ("Business Software", "Business_Software"), ("Finance, Tax", "Finance_Tax"), ("Video_Images", "Video_Images"),
    ("Data/Text", "Data_Text"), ("../etc", ".._etc")])
def test_category_folder_names_are_stabletoolbenchs(category, folder):
    assert server.standard_category(category) == folder


def test_cache_miss_falls_through_to_api_not_found(serve, cache):
    url = serve(cache=str(cache)).url
    status, record = call(url, "Data", "Quotes Hub", "Random Quote", '{"lang": "fr"}')
    assert status == 200 and "API not found" in record["error"]
    assert call(url, "Data", "Quotes Hub", "Other Api", '{"lang": "en"}')[1]["error"].startswith("API not found")


QUOTES = os.path.join("Data", "quotes_hub_for_Data", "random_quote.json")  # the API's file under the cache


@pytest.mark.parametrize("content, says", [
    (b"\xff\xfe{}", "not UTF-8 text (invalid start byte at byte 0)"),
    (b"[" * 100_000, "nested too deep"),
    (b'{"{\'lang\': \'en\'}": {"error": "", "response": "Measu', "not JSON (Unterminated string"),  # cut short
    (b"", "not JSON (Expecting value"),
    (b'[{"error": "", "response": "a list, not an object"}]', "its top level is an array"),
    (b'"text"', "its top level is a string"),
    (b'{"{\'lang\': \'en\'}": "text, not a record"}', "the entry for \"{'lang': 'en'}\" is not a record"),
], ids=["bad-utf8", "nested-too-deep", "truncated", "empty", "top-level-list", "top-level-string", "entry-not-a-record"])
def test_a_corrupt_cache_file_is_an_error_record_naming_it_never_a_5xx_or_api_not_found(serve, cache, content, says):
    (cache / QUOTES).write_bytes(content)
    url = serve(cache=str(cache)).url
    status, record = call(url, "Data", "Quotes Hub", "Random Quote", '{"lang": "en"}')
    assert status == 200 and record["response"] == ""  # a 5xx is retried by toolclient.ToolClient as a server fault
    assert record["error"].startswith(f"response cache file {QUOTES}: ") and says in record["error"], record
    assert str(cache) not in record["error"]  # named under the cache folder, not by the server's full path
    client = toolclient.ToolClient(url, retries=0)  # a 5xx raises ToolServerError
    assert client.call("Data", "Quotes Hub", "Random Quote", {"lang": "en"}) == record
    hit = call(url, "Business Software", "Quill Lookup", "id", '{"is_id": 42}')[1]
    assert hit["response"] == {"record": "the cached one"}  # other cache files still answer


def test_an_unreadable_cache_file_is_an_error_record_naming_it(serve, cache, monkeypatch):
    real_open = open

    def denied(path, *a, **kw):  # chmod 000 would not stop root
        if str(path).endswith("random_quote.json"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *a, **kw)
    monkeypatch.setattr(server, "open", denied, raising=False)
    url = serve(cache=str(cache)).url
    status, record = call(url, "Data", "Quotes Hub", "Random Quote", '{"lang": "en"}')
    assert status == 200 and record == {"error": f"response cache file {QUOTES}: cannot read it (Permission denied)",
                                        "response": ""}


def test_a_cache_file_repaired_while_serving_is_read_again_and_a_broken_one_is_said_once_on_stderr(serve, cache, capfd):
    good = (cache / QUOTES).read_bytes()
    (cache / QUOTES).write_bytes(b"\xff")
    url = serve(cache=str(cache)).url
    for _ in range(3):
        assert "not UTF-8" in call(url, "Data", "Quotes Hub", "Random Quote", '{"lang": "en"}')[1]["error"]
    err = capfd.readouterr().err
    assert err.count("random_quote.json: not UTF-8") == 1, err  # the full path, for the operator
    (cache / QUOTES).write_bytes(good)
    os.utime(cache / QUOTES, ns=(time.time_ns() + 10**9,) * 2)  # a new mtime even on a coarse clock
    assert call(url, "Data", "Quotes Hub", "Random Quote", '{"lang": "en"}')[1]["response"] == {"quote": "Measure twice."}


def test_backends_answer_in_order_embedded_then_cache_then_simulated(serve, cache):
    write_cache(cache, "Weather", "skycast_for_Weather", "forecast.json",
                {str({"city": CITY}): {"error": "", "response": "stale cache"}})
    write_cache(cache, "Weather", "orbit_weather_api_for_Weather", "current_conditions.json",
                {str({"location": "Lake Ansel"}): {"error": "", "response": "cached conditions"}})
    url = serve(cache=str(cache), queries=[STB_QUERIES]).url
    assert call(url, "Weather", "SkyCast", "forecast", {"city": CITY})[1] == direct("SkyCast", "forecast", {"city": CITY})
    assert call(url, "Weather", "Orbit Weather API", "Current Conditions", {"location": "Lake Ansel"})[1]["response"] == "cached conditions"
    assert call(url, "Weather", "Orbit Weather API", "Current Conditions", {"location": "Porto Veyra"})[1]["response"]["_simulated"] is True


@pytest.mark.parametrize("category, tool, api", [
    ("..", "secret", "secret"),
    ("../..", "secret", "secret"),
    ("../../etc", "passwd", "passwd"),
    ("a/b", "../../secret", "a/b"),
    ("Data\n", "quotes_hub", "random_quote"),
    ("/", "secret", "secret"),
])
def test_path_traversal_in_names_never_reads_outside_the_cache(serve, cache, tmp_path, monkeypatch, category, tool, api):
    # A record where a naive join of ("..", "secret", "secret") lands, next to the cache; every other
    # read is caught by the spy on open().
    write_cache(tmp_path, ".", "secret_for_..", "secret.json", {str({}): {"error": "", "response": "SECRET"}})
    opened = []
    real_open = open

    def spy_open(path, *a, **kw):
        opened.append(os.path.realpath(path))
        return real_open(path, *a, **kw)
    monkeypatch.setattr(server, "open", spy_open, raising=False)
    url = serve(cache=str(cache)).url
    status, record = call(url, category, tool, api, "{}")
    assert status == 200 and "SECRET" not in json.dumps(record)
    assert all(p.startswith(str(cache.resolve()) + os.sep) for p in opened), opened


def test_names_in_a_request_are_never_imported_or_executed(tool_server, tmp_path, monkeypatch):
    # StableToolBench runs `from my_tools.<category>.<tool>.api import <api>`; plant such a module.
    marker = tmp_path / "MARKER"
    pkg = tmp_path / "my_tools" / "Data" / "canary"
    pkg.mkdir(parents=True)
    code = f"open({str(marker)!r}, 'w').close()\ndef boom(**kw): return 'executed'\n"
    for d in (tmp_path / "my_tools", tmp_path / "my_tools" / "Data", pkg):
        (d / "__init__.py").write_text(code)
    (pkg / "api.py").write_text(code)
    (tmp_path / "canary_mod.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    for category, tool, api, tool_input in [
        ("Data", "canary", "boom", "{}"),
        ("os", "os", "system", json.dumps({"command": f"touch {marker}"})),
        ("builtins", "__import__", "canary_mod", "{}"),
        ("canary_mod", "canary_mod", "__import__", '{"name": "canary_mod"}'),
    ]:
        status, record = call(tool_server.url, category, tool, api, tool_input)
        assert status == 200 and record["error"].startswith("API not found"), record
    status, record = call(tool_server.url, "Weather", "SkyCast", "forecast", "__import__('canary_mod')")
    assert record["error"] == "Tool input parse error...\n"
    assert not marker.exists()
    assert "canary_mod" not in sys.modules and "my_tools" not in sys.modules


# ---- the simulated backend: APIs described by StableToolBench query files -------------------
def test_simulated_response_is_shaped_by_template_response(serve):
    url = serve(queries=[STB_QUERIES]).url
    r = call(url, "Weather", "Orbit Weather API", "3-Day Forecast", {"location": "Porto Veyra"})[1]
    assert r["error"] == ""
    fc = r["response"]
    assert fc["_simulated"] is True and set(fc) == {"_simulated", "location", "days", "warnings"}
    assert isinstance(fc["location"], str)
    assert len(fc["days"]) == 3 and all(set(d) == {"date", "high", "low", "summary"} for d in fc["days"])
    assert all(isinstance(d["high"], float) and isinstance(d["summary"], str) for d in fc["days"])
    assert len(fc["warnings"]) == 2 and all(isinstance(x, str) for x in fc["warnings"])  # a flat list of str
    now = call(url, "Weather", "Orbit Weather API", "Current Conditions", {"location": "Lake Ansel"})[1]["response"]
    assert isinstance(now["temperature"], float) and isinstance(now["wind_kph"], int) and isinstance(now["humid"], bool)
    assert set(now["station"]) == {"id", "elevation_m"} and isinstance(now["station"]["elevation_m"], int)
    items = call(url, "Business Software", "Quill Lookup", "/v2/entries/search", {"is_from": "2021-01-01"})[1]["response"]["items"]
    assert len(items) == 3  # _list_length 8, capped at 3 to keep observations short
    assert call(url, "Weather", "Orbit Weather API", "Pollen Count", "")[1]["response"]["_simulated"] is True  # no template
    balance = call(url, "Finance", "ledger.io", "Get Balance", {"account": "ACC-77"})[1]["response"]
    assert balance["_simulated"] is True and isinstance(balance["results"], str)  # a bare template is wrapped


def test_simulated_response_is_deterministic_for_a_request_and_differs_between_inputs(serve):
    a, b = serve(queries=[STB_QUERIES]).url, serve(queries=[STB_QUERIES]).url
    ask = lambda url, loc: call(url, "Weather", "Orbit Weather API", "3-Day Forecast", {"location": loc})[1]
    assert ask(a, "Porto Veyra") == ask(a, "Porto Veyra") == ask(b, "Porto Veyra")
    assert ask(a, "Porto Veyra") != ask(a, "Lake Ansel")
    by_names = [call(a, "Business Software", "Quill Lookup", api, {"is_id": 7})[1]
                for api in ("id", "is_id", "is_id_for_quill_lookup")]
    assert by_names[0] == by_names[1] == by_names[2] and by_names[0]["response"]["_simulated"] is True


# ---- load --------------------------------------------------------------------------------
def test_eight_parallel_clients_get_every_answer_right(tool_server, test_tasks):
    calls = [(*t.api[s["name"]], s["arguments"]) for t in test_tasks for s in t.expert[:-1]]
    calls += [("Weather", "SkyCast", "forecast", {"city": "Atlantis"}),
              ("Travel", "RailNet", "ticket_price", {"train_id": "TR123", "travel_class": "economy"}),
              ("Food", "DineSpot", "book_table", {"restaurant_id": "R1", "people": 40})]
    expected = [direct(tool, api, args) for _, tool, api, args in calls]
    client = toolclient.ToolClient(tool_server.url, timeout=10, retries=0)  # a lost request raises
    n_threads, n_requests = 8, 200

    def worker(k):
        idx = [(k * n_requests + i) * 7 % len(calls) for i in range(n_requests)]
        return [(j, client.call(*calls[j])) for j in idx]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_threads) as pool:
        answers = [a for part in pool.map(worker, range(n_threads)) for a in part]
    dt = time.perf_counter() - t0
    assert len(answers) == n_threads * n_requests
    wrong = [(calls[j], got) for j, got in answers if got != expected[j]]
    assert not wrong, wrong[:3]
    print(f"\nload: {n_threads} threads x {n_requests} requests in {dt:.2f} s = "
          f"{len(answers) / dt:.0f} requests/s")


# ---- holding its ground: idle, slow, resetting and surplus clients --------------------------
def connect(url):
    u = urlsplit(url)
    return socket.create_connection((u.hostname, u.port), timeout=5)


def raw_exchange(url, data):
    """Send raw bytes on a new connection and read until the server closes it ->
    (status or None when nothing came back, JSON body or None, seconds until closed)."""
    t0, chunks = time.monotonic(), []
    with connect(url) as s:
        s.sendall(data)
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:  # closed with bytes of ours unread: what came before is intact
            pass
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else None), (json.loads(body) if body else None), time.monotonic() - t0


def http_request(body):
    data = json.dumps(body).encode()
    return b"POST /virtual HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


FORECAST = {"category": "Weather", "tool_name": "SkyCast", "api_name": "forecast",
            "tool_input": json.dumps({"city": CITY})}


def test_listen_backlog_is_at_least_128(serve):
    assert serve().request_queue_size >= 128  # socketserver's 5 reset 3 % of new connections under load


def test_an_idle_new_connection_holds_no_thread_and_is_closed_after_the_timeout(serve):
    srv = serve(timeout=0.3)
    before = threading.active_count()
    with connect(srv.url) as s:
        t0 = time.monotonic()
        time.sleep(0.1)
        assert threading.active_count() <= before  # accepted, parked: no handler thread
        assert s.recv(1) == b""                     # then closed by the server
        assert 0.2 < time.monotonic() - t0 < 3


def test_a_keep_alive_connection_silent_after_its_request_is_closed_after_the_timeout(serve):
    srv = serve(timeout=0.3)
    u = urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    conn.request("GET", "/health")
    assert conn.getresponse().read() == b'{"status": "ok"}'
    t0 = time.monotonic()
    assert conn.sock.recv(1) == b""
    assert 0.2 < time.monotonic() - t0 < 3
    conn.close()


def test_a_body_shorter_than_its_content_length_gets_408_json_after_the_timeout(serve):
    srv = serve(timeout=0.3)
    status, record, seconds = raw_exchange(srv.url, b"POST /virtual HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"cat")
    assert status == 408 and "Content-Length 100" in record["error"] and record["response"] == ""
    assert seconds < 3
    assert_still_serves(srv.url)


def test_idle_sockets_do_not_delay_a_client_that_sends(serve):
    srv = serve(timeout=5, max_threads=2)
    idle = [connect(srv.url) for _ in range(20)]  # ten times the threads
    try:
        time.sleep(0.1)
        t0 = time.monotonic()
        assert_still_serves(srv.url)
        assert time.monotonic() - t0 < 2.5  # long before the idle ones time out
    finally:
        for s in idle:
            s.close()


def slow_answers(srv, seconds):
    """Make srv's answers take `seconds`; returns [the most answers that ran at once]."""
    tools, lock, running, peak = srv.RequestHandlerClass.tools, threading.Lock(), [0], [0]
    real = tools.answer

    def slow(body):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(seconds)
        with lock:
            running[0] -= 1
        return real(body)
    tools.answer = slow
    return peak


def test_requests_beyond_max_threads_wait_for_a_thread_and_all_get_their_answer(serve):
    srv = serve(max_threads=1)
    peak = slow_answers(srv, 0.1)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: request(srv.url, body=FORECAST), range(4)))
    assert answers == [(200, direct("SkyCast", "forecast", {"city": CITY}))] * 4
    assert peak == [1]


def test_a_request_that_waits_longer_than_the_timeout_for_a_thread_gets_503_json(serve):
    srv = serve(max_threads=1, timeout=0.3)
    slow_answers(srv, 1.0)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(request, srv.url, body=FORECAST)
        time.sleep(0.2)                           # the one thread is busy with it for 1 s
        status, record, _ = raw_exchange(srv.url, http_request(FORECAST))
        assert status == 503 and "busy" in record["error"] and record["response"] == ""
        assert first.result()[0] == 200


def test_a_connection_beyond_max_connections_gets_503_json_at_once(serve):
    srv = serve(max_connections=2)
    held = [connect(srv.url) for _ in range(2)]
    try:
        time.sleep(0.1)
        status, record, seconds = raw_exchange(srv.url, b"")
        assert status == 503 and "2 connections" in record["error"] and seconds < 2
    finally:
        for s in held:
            s.close()
    for _ in range(40):  # the server sees the two leave within its selector's next look
        if srv.open == 0:
            break
        time.sleep(0.05)
    assert_still_serves(srv.url)


@pytest.mark.parametrize("length", ['"many"', "[3]", "-1e999"], ids=["text", "list", "minus-infinity"])
def test_a_template_with_a_bad_list_length_is_an_error_record_with_http_200(serve, tmp_path, length):
    q = [{"api_list": [{"tool_name": "Broken Tool", "api_name": "List Things", "category_name": "Data",
                        "template_response": json.loads('{"items": {"name": "str", "_list_length": %s}}' % length)}]}]
    (tmp_path / "q.json").write_text(json.dumps(q))
    url = serve(queries=[str(tmp_path / "q.json")]).url
    status, record = call(url, "Data", "Broken Tool", "List Things", "{}")
    assert status == 200 and record["response"] == ""
    assert "template_response" in record["error"] and "List Things" in record["error"]
    assert_still_serves(url)


@pytest.mark.parametrize("raw, status", [
    (b"PUT /virtual HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 501),
    (b"DELETE /virtual HTTP/1.1\r\n\r\n", 501),
    (b"PATCH /virtual HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 501),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/2.0\r\n\r\n", 505),
    (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
], ids=["PUT", "DELETE", "PATCH", "bad-request-line", "bad-version", "header-too-long", "uri-too-long"])
def test_http_servers_own_errors_have_a_json_body_not_html(tool_server, raw, status):
    got, record, _ = raw_exchange(tool_server.url, raw)
    assert got == status and record["error"] and record["response"] == ""
    assert_still_serves(tool_server.url)


def test_a_client_that_resets_after_sending_is_at_most_one_line_on_stderr_and_no_traceback(serve, capfd):
    srv = serve()
    full, short = http_request(FORECAST), b"POST /virtual HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"
    for data in (full, short) * 3:
        s = connect(srv.url)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
        s.sendall(data)
        s.close()
    assert_still_serves(srv.url)
    time.sleep(0.3)
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) <= 6, err


@pytest.mark.parametrize("content, says", [
    (b"{not json", "not JSON"),
    (None, "not JSON"),  # the fixture, truncated
    (b'{"api_list": []}', "not a non-empty JSON list"),
    (b"[]", "not a non-empty JSON list"),
    (b'[{"query": "no api_list"}]', "query 0: not an object with an 'api_list' list"),
    (b'[{"api_list": []}, {"api_list": [{"tool_name": "t"}]}]',
     "query 1, api_list[0]: missing or not a string: api_name"),
    (b'[{"api_list": [{"tool_name": 3, "api_name": "a"}]}]', "missing or not a string: tool_name"),
    ('[{"api_list": "caf\u00e9"}]'.encode("latin-1"), "not UTF-8"),
], ids=["not-json", "truncated", "not-a-list", "empty", "no-api-list", "no-api-name", "tool-name-not-str", "latin-1"])
def test_a_bad_query_file_is_a_config_error_naming_the_file_and_the_item(tmp_path, content, says):
    path = tmp_path / "bad.json"
    path.write_bytes(content if content is not None else open(STB_QUERIES, "rb").read()[:500])
    with pytest.raises(server.ConfigError) as e:
        server.make_server(queries=[str(path)])
    assert isinstance(e.value, ValueError)  # what callers (steptool.py) catch
    assert str(path) in str(e.value) and says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw, says", [
    (dict(queries=["{tmp}/missing.json"]), "No such file or directory"),
    (dict(cache="{tmp}/no-such-cache"), "does not exist"),
    (dict(cache="{tmp}/a-file"), "not a folder"),
    (dict(timeout=0), "timeout must be > 0"),
    (dict(timeout=float("inf")), "timeout must be > 0 and finite"),
    (dict(max_threads=0), "max_threads must be > 0"),
    (dict(max_connections=-1), "max_connections must be > 0"),
], ids=["missing-query-file", "missing-cache", "cache-is-a-file", "timeout", "timeout-inf", "max-threads",
        "max-connections"])
def test_a_missing_file_or_folder_or_a_bad_limit_is_a_config_error_before_listening(tmp_path, kw, says):
    (tmp_path / "a-file").write_text("")
    kw = {k: [x.format(tmp=tmp_path) for x in v] if isinstance(v, list) else
          v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(server.ConfigError, match=says):
        server.make_server(**kw)


# ---- the command line ------------------------------------------------------------------------
def test_server_command_line_serves_and_simulates_like_the_library(tmp_path):
    proc = subprocess.Popen([sys.executable, "-u", "-m", "harness.server", "--port", "0", "--queries", STB_QUERIES],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONHASHSEED": "12345"})
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://[\d.]+:\d+)/virtual \((\d+) simulated APIs\)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert int(m.group(2)) == 7  # the fixture's APIs
        url = m.group(1)
        assert_still_serves(url)
        body = {"category": "Finance", "tool_name": "ledger.io", "api_name": "Payments",
                "tool_input": '{"account": "ACC-77"}'}
        assert request(url, body=body) == (200, server.ToolServer(queries=[STB_QUERIES]).answer(body)[1])
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.parametrize("args, names", [
    (["--queries", "{tmp}/bad.json"], "bad.json: query 0, api_list[0]"),
    (["--queries", "{tmp}/truncated.json"], "truncated.json: cannot read query file: not JSON"),
    (["--cache", "{tmp}/no-such-cache"], "no-such-cache: does not exist"),
    (["--timeout", "0"], "timeout must be > 0"),
], ids=["query-missing-a-key", "query-file-truncated", "missing-cache", "timeout"])
def test_server_command_line_refuses_bad_input_in_one_line_with_exit_status_2(tmp_path, args, names):
    (tmp_path / "bad.json").write_text('[{"api_list": [{"tool_name": "t"}]}]')
    (tmp_path / "truncated.json").write_bytes(open(STB_QUERIES, "rb").read()[:500])
    proc = subprocess.run([sys.executable, "-m", "harness.server", "--port", "0", *[a.format(tmp=tmp_path) for a in args]],
                          cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout)
    assert len(proc.stderr.strip().splitlines()) == 1 and names in proc.stderr, proc.stderr


def test_load_script_with_a_tiny_budget_prints_every_figure_and_the_server_gets_back_to_its_threads():
    proc = subprocess.run([sys.executable, "-m", "harness.server_bench", "--clients", "4", "--requests", "5",
                           "--keepalive-clients", "2", "--keepalive-requests", "10", "--idle", "5",
                           "--server-timeout", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for figure in ("requests", "errors", "req/s", "p50", "p99", "max", "threads", "RSS", "before", "during", "after"):
        assert figure in proc.stdout, figure
    out = json.loads(proc.stdout.splitlines()[-1])
    r = out["round_1"]
    for phase, n in (("new_connection", 20), ("keep_alive", 20)):
        assert r[phase]["requests"] == n and r[phase]["errors"] == 0, r[phase]
        assert {"req_per_s", "p50_ms", "p99_ms", "max_ms", "server_threads_peak", "server_rss_mib_peak",
                "server_cpu_s"} <= set(r[phase])
    assert r["idle_open"]["sockets"] == 5 and r["idle_closed_by_server"] == 5
    assert r["after"]["server_threads"] == out["before"]["server_threads"] and r["server_stderr_lines"] == 0


# ---- StableToolBench's own sample queries (only where ../shared exists) -----------------------
@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared (reference data) is not present")
def test_stabletoolbench_sample_queries_answer_every_relevant_api_the_same_twice(serve):
    path = os.path.join(SHARED, "data", "stabletoolbench", "sample_queries.json")
    url = serve(queries=[path]).url
    with open(path) as f:
        queries = json.load(f)
    tasks = formats.load_tasks(path)
    client = toolclient.ToolClient(url, retries=0)
    n = 0
    for q, task in zip(queries, tasks):
        assert len(q["relevant APIs"]) == len(task.relevant) > 0
        for tool, api_name in q["relevant APIs"]:
            a = next(a for a in q["api_list"] if a["tool_name"] == tool and a["api_name"] == api_name)
            args = {env.change_name(env.standardize(p["name"])): p["default"]
                    for p in a["required_parameters"] + a["optional_parameters"] if p.get("default") not in (None, "")}
            cat, t, api = task.api[env.function_name(tool, api_name)]
            first, second = client.call(cat, t, api, args), client.call(cat, t, api, args)
            assert first == second, (tool, api_name)
            assert first["error"] == "" and first["response"]["_simulated"] is True, (tool, api_name, first)
            n += 1
    assert n >= 12


def test_a_fifo_given_as_a_query_file_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "queries.json")
    os.mkfifo(fifo)
    with pytest.raises(server.ConfigError, match="FIFO"):      # open() on a FIFO would wait for a writer forever
        server.load_queries([fifo])
