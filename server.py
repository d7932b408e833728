"""A local tool server that speaks StableToolBench's "virtual" protocol (the paper's Sec. 5.1 setup).

    python server.py [--host 127.0.0.1] [--port 8081] [--cache DIR] [--queries FILE ...]

POST /virtual  {"category", "tool_name", "api_name", "tool_input": JSON text or object, ...}
            -> {"error": str, "response": ...}          GET /health -> 200 {"status": "ok"}

A call is answered by the first backend that knows the API:
  a. the embedded benchmark (world.py): deterministic Python functions over a fictional world;
  b. a StableToolBench response cache (--cache DIR), read-only:
     DIR/<category>/<tool>_for_<category>/<api>.json, keyed by str(tool_input);
  c. APIs described in StableToolBench query files (--queries): a deterministic response shaped
     by the API's `template_response`, seeded by the request, marked `"_simulated": true`;
  d. otherwise an error record naming what was not found.
Names are matched after ToolBench's standardization: `TheClique` / `theclique`, `Transfermarkt
search` / `transfermarkt_search` / `transfermarkt_search_for_theclique` all reach the same API.

Departures from StableToolBench's server:
1. No real RapidAPI calls and no GPT-simulated responses (backend c is a seeded template filler):
   the server needs no network and no key. Point `--tool-server` at a StableToolBench server for that.
2. Nothing a request names is imported or executed (StableToolBench builds `from my_tools.<category>...
   import <api>` from request fields); names reach the file system only after standardization
   and a check that the path stays inside the cache folder. The cache is never written.
"""
import argparse
import hashlib
import json
import os
import random
import re
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import world
from env import change_name, standardize

MAX_BODY = 1 << 20  # bytes; larger requests get HTTP 413
REQUIRED = ("category", "tool_name", "api_name", "tool_input")
PARSE_ERROR = {"error": "Tool input parse error...\n", "response": ""}  # the protocol's own answer
_SAFE = re.compile(r"[\w\-^]+")  # one path component (fullmatch): no separators, no dots, no newline


def standard_category(category):
    """StableToolBench's category folder name: spaces, commas and slashes -> '_', then one pass of
    '__' -> '_' (exactly as its server does, so that its cache folders are found)."""
    return re.sub(r"[ ,/]", "_", str(category)).replace("__", "_")


def _api_key(tool, api, category=""):
    """(tool, api) after ToolBench standardization; strips `_for_<category>` / `_for_<tool>` suffixes.
    Reserved API names get `is_` (change_name), as in the function names and the cache file names."""
    t, a = standardize(tool), standardize(api)
    cat = standardize(category)
    if cat and t.endswith("_for_" + cat):
        t = t[:-len("_for_" + cat)]
    if a.endswith("_for_" + t):
        a = a[:-len("_for_" + t)]
    return t, change_name(a)


class ToolServer:
    """The protocol, without HTTP: answer(body) -> (http_status, record). Thread-safe (read-only)."""

    def __init__(self, cache=None, queries=()):
        self.world = world.World()
        self.embedded = {_api_key(tool, api): (tool, api) for _, tool, api, *_ in world.APIS}
        self.cache = os.path.realpath(cache) if cache else None
        self.simulated = {}
        for path in queries:
            with open(path) as f:
                for q in json.load(f):
                    for a in q.get("api_list", []):
                        self.simulated[_api_key(a["tool_name"], a["api_name"])] = a

    def answer(self, body):
        if not isinstance(body, dict):
            return 400, {"error": "request body must be a JSON object", "response": ""}
        missing = [k for k in REQUIRED if k not in body]
        if missing:
            return 400, {"error": f"missing fields: {', '.join(missing)}", "response": ""}
        cat, tool, api, args = (body[k] for k in REQUIRED)
        if not all(isinstance(x, str) for x in (cat, tool, api)):
            return 400, {"error": "category, tool_name and api_name must be strings", "response": ""}
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
                return 200, PARSE_ERROR
        if not isinstance(args, dict):
            return 200, PARSE_ERROR
        key = _api_key(tool, api, cat)
        if key in self.embedded:                                        # a. embedded benchmark
            return 200, world.call_api(self.world, *self.embedded[key], args)
        record = self._from_cache(cat, key, args)                       # b. response cache
        if record is not None:
            return 200, record
        if key in self.simulated:                                       # c. simulated from a template
            return 200, {"error": "", "response": simulate(self.simulated[key], key, args)}
        return 200, {"error": f"API not found: category '{cat}', tool '{tool}', api '{api}' "  # d.
                              "(not in the embedded benchmark, the cache or the query files)", "response": ""}

    def _from_cache(self, category, key, args):
        if not self.cache:
            return None
        cat, (tool, api) = standard_category(category), key
        parts = [cat, f"{tool}_for_{cat}", api + ".json"]
        if not all(_SAFE.fullmatch(p.removesuffix(".json")) for p in parts):
            return None
        path = os.path.realpath(os.path.join(self.cache, *parts))
        if not path.startswith(self.cache + os.sep) or not os.path.isfile(path):
            return None
        return _load_cache_file(path, os.path.getmtime(path)).get(str(args))


@lru_cache(maxsize=256)
def _load_cache_file(path, mtime):
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def simulate(api, key, args):
    """A deterministic response shaped by `template_response`; every value says it is simulated."""
    seed = hashlib.sha256(json.dumps([key, args], sort_keys=True).encode()).hexdigest()
    rng = random.Random(seed)

    def fill(t, name):
        if isinstance(t, dict):
            n = t.get("_list_length")
            d = {k: fill(v, k) for k, v in t.items() if k != "_list_length"}
            return d if n is None else [fill({k: v for k, v in t.items() if k != "_list_length"}, name)
                                        for _ in range(min(int(n), 3))]
        if isinstance(t, list):  # [{..., "_list_length": n}] / ["list of str ..."] expand to <= 3 items
            out = []
            for item in t[:3]:
                v = fill(item, name)
                out.extend(v if isinstance(v, list) and not isinstance(item, list) else [v])
            return out
        s = str(t).lower()
        if s.startswith("list of"):
            return [f"simulated {name} {rng.randrange(16**4):04x}" for _ in range(2)]
        if s in ("int", "integer"):
            return rng.randrange(1000)
        if s == "float":
            return round(rng.uniform(0, 100), 2)
        if s in ("bool", "boolean"):
            return rng.random() < 0.5
        return f"simulated {name} {rng.randrange(16**4):04x}"

    template = api.get("template_response")
    out = fill(template, "value") if template else {"message": "simulated response (no template)"}
    if not isinstance(out, dict):
        out = {"results": out}
    return {"_simulated": True, **out}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection
    disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms delayed-ACK stall)
    tools = None                   # set by make_server

    def _send(self, status, obj):
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.split("?")[0] == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": f"no route {self.path}", "response": ""})

    def do_POST(self):
        if self.path.split("?")[0] != "/virtual":
            self.close_connection = True
            return self._send(404, {"error": f"no route {self.path}", "response": ""})
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            return self._send(411, {"error": "Content-Length required", "response": ""})
        if n < 0:  # rfile.read(-1) would wait for the client to close the connection
            self.close_connection = True
            return self._send(400, {"error": f"bad Content-Length {n}", "response": ""})
        if n > MAX_BODY:
            self.close_connection = True  # the unread body must not be parsed as a next request
            return self._send(413, {"error": f"body of {n} bytes exceeds {MAX_BODY}", "response": ""})
        try:
            body = json.loads(self.rfile.read(n))
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nested too deep
            return self._send(400, {"error": f"malformed JSON body: {str(e)[:200]}", "response": ""})
        try:
            self._send(*self.tools.answer(body))
        except Exception as e:  # a bug in one API must not take the server down
            self._send(500, {"error": f"internal error: {type(e).__name__}: {e}", "response": ""})

    def log_message(self, *args):
        pass


def make_server(host="127.0.0.1", port=0, cache=None, queries=()):
    """A ThreadingHTTPServer bound to host:port (0 = a free port); `.url` is its address."""
    handler = type("BoundHandler", (Handler,), {"tools": ToolServer(cache, queries)})
    srv = ThreadingHTTPServer((host, port), handler)
    srv.daemon_threads = True
    srv.url = f"http://{host}:{srv.server_address[1]}"
    return srv


def start_in_thread(**kw):
    """Start a server in a daemon thread (tests, steptool.py); stop it with .shutdown()."""
    srv = make_server(**kw)
    # poll_interval: how often serve_forever checks for shutdown(); 0.05 s makes .shutdown() quick
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="StableToolBench-compatible local tool server")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--cache", help="StableToolBench response cache folder (read-only)")
    ap.add_argument("--queries", nargs="*", default=[], help="StableToolBench query files to simulate")
    a = ap.parse_args()
    srv = make_server(a.host, a.port, a.cache, a.queries)
    print(f"tool server on {srv.url}/virtual ({len(srv.RequestHandlerClass.tools.simulated)} simulated APIs)")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
