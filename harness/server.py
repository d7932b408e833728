"""A local tool server that speaks StableToolBench's "virtual" protocol (the paper's Sec. 5.1 setup).

    python -m harness.server [--host 127.0.0.1] [--port 8081] [--cache DIR] [--queries FILE ...]
                     [--timeout 10] [--max-threads 64] [--max-connections 512]
    python -m harness.server_bench   # the load test: this server in a separate process, many clients

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

Bad input and load (Server below). Threads serve requests, not sockets: a connection with no
request in flight (a new one not yet sending, or a keep-alive one LINGER = 50 ms after its last
answer) is parked in one selector thread and holds no handler thread, so idle sockets cannot
starve clients that are sending (python -m harness.server_bench measures it).
- Query files and the cache folder are checked when the server is made: ConfigError (a ValueError),
  one line naming the file and the query; `python -m harness.server` prints it and exits with status 2.
- A template that cannot be filled (say a `_list_length` of "many") is the protocol's error record
  with HTTP 200: the query file is at fault, and toolclient.ToolClient retries a 5xx as a server fault.
- So is a cache file that cannot be used (unreadable, not UTF-8, not JSON or cut short, nested too
  deep, not an object of records): the error names the file (under --cache) and what is wrong, and
  stderr gets one line per version of the file. A 5xx would be retried, then stop training as if the
  server were down; "API not found" would hide the broken file.
- HTTP framing (RFC 7230 Sec. 3.3.3): a request whose body length is in doubt is 400 and closed, since
  a proxy in front that reads the other length would see a different next request: Content-Length
  together with Transfer-Encoding, Content-Length values that differ ("5, 6", or two fields), one
  that is not plain ASCII digits ("+5", "1_0" and " 1 0" are not), a header line that is not
  `name: value` (Sec. 3.2.4). A chunked body is not read: 411, asking for a Content-Length. A body
  sent with GET is never read: the answer closes the connection. `Expect: 100-continue` gets
  "100 Continue" only for a body the server will read; a too large one is 413 at once. An
  absolute-form target (`POST http://host:8081/virtual`, Sec. 5.3.2) routes by its path.
- Listen backlog 128 (socketserver's 5 reset 3 % of new connections in a load test).
- --timeout s per read or write: a parked connection silent that long is closed; a request whose
  body stops short of its Content-Length gets 408 and is closed; one whose headers stop before their
  blank line is closed without an answer (http.server's own handling; no deadline for the whole
  header block). The limit is per read: a client that trickles a byte at a time keeps its thread
  (--max-threads bounds how many can).
- --max-threads handler threads at once; a request beyond them waits for a free thread (FIFO), and
  after --timeout s of waiting gets 503 and is closed.
- --max-connections open connections; one more is answered 503 at once and closed.
- Every error status has a JSON body {"error": ..., "response": ""}, never http.server's HTML.
- A connection that fails (a client's reset, a broken pipe) is one line on stderr, no traceback.
"""
import argparse
import collections
import hashlib
import json
import os
import random
import re
import selectors
import socket
import sys
import threading
import time
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer

from harness import formats, toolclient
from harness import world
from env import change_name, standardize

MAX_BODY = 1 << 20  # bytes; larger requests get HTTP 413
LINGER = 0.05       # s a handler thread waits for a connection's next request before parking it
REQUIRED = ("category", "tool_name", "api_name", "tool_input")
PARSE_ERROR = {"error": "Tool input parse error...\n", "response": ""}  # the protocol's own answer
_SAFE = re.compile(r"[\w\-^]+")  # one path component (fullmatch): no separators, no dots, no newline
_DIGITS = re.compile(r"[0-9]+")  # a Content-Length (fullmatch); int() also takes "+5", "1_0", " 5", "\u0665"
_ABSOLUTE = re.compile(r"https?://[^/?#]+", re.IGNORECASE)  # the scheme and host of an absolute-form target


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


def _read_json(path):
    """(value, "") for a JSON file, or (None, what is wrong with it) in a few words: every way a file
    can fail to be JSON, so that callers answer for the file instead of failing themselves."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")  # decoded whole, so that a bad byte's offset is the file's
        return json.loads(text), ""
    except OSError as e:
        return None, f"cannot read it ({e.strerror or e})"
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text ({e.reason} at byte {e.start})"
    except RecursionError:  # "[[[[..." deeper than the interpreter's recursion limit
        return None, "not JSON that can be read (nested too deep)"
    except json.JSONDecodeError as e:  # not JSON, empty, or cut short
        return None, f"not JSON ({str(e)[:120]})"


class ConfigError(ValueError):
    """A bad query file, cache folder or server setting; the message is one line naming it."""


def load_queries(paths):
    """{(tool, api): api entry} from StableToolBench query files: each a non-empty JSON list of
    objects with an `api_list` of objects with string `tool_name` and `api_name`."""
    apis = {}
    for path in paths:
        queries = formats.read_json(path, "query file", ConfigError)   # the shared reader: a FIFO never blocks
        if not isinstance(queries, list) or not queries:
            raise ConfigError(f"query file {path}: not a non-empty JSON list of queries")
        for i, q in enumerate(queries):
            if not isinstance(q, dict) or not isinstance(q.get("api_list"), list):
                raise ConfigError(f"query file {path}: query {i}: not an object with an 'api_list' list")
            for j, a in enumerate(q["api_list"]):
                bad = [k for k in ("tool_name", "api_name") if not isinstance(a, dict) or not isinstance(a.get(k), str)]
                if bad:
                    raise ConfigError(f"query file {path}: query {i}, api_list[{j}]: "
                                      f"missing or not a string: {', '.join(bad)}")
                apis[_api_key(a["tool_name"], a["api_name"])] = a
    return apis


class ToolServer:
    """The protocol, without HTTP: answer(body) -> (http_status, record). Thread-safe (read-only)."""

    def __init__(self, cache=None, queries=()):
        if cache and not os.path.isdir(cache):
            raise ConfigError(f"cache folder {cache}: {'not a folder' if os.path.exists(cache) else 'does not exist'}")
        self.simulated = load_queries(queries)
        self.world = world.World()
        self.embedded = {_api_key(tool, api): (tool, api) for _, tool, api, *_ in world.APIS}
        self.cache = os.path.realpath(cache) if cache else None

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
            try:
                return 200, {"error": "", "response": simulate(self.simulated[key], key, args)}
            except Exception as e:  # the query file's template is broken, not the server: no 5xx
                return 200, {"error": f"simulated response failed: template_response of tool '{tool}', api "
                                      f"'{api}': {type(e).__name__}: {str(e)[:200]}", "response": ""}
        return 200, {"error": f"API not found: category '{cat}', tool '{tool}', api '{api}' "  # d.
                              "(not in the embedded benchmark, the cache or the query files)", "response": ""}

    def _from_cache(self, category, key, args):
        """The cached record for args; None when the cache has none; the protocol's error record, naming
        the file, when the API's cache file cannot be used (the file is at fault, not the server)."""
        if not self.cache:
            return None
        cat, (tool, api) = standard_category(category), key
        parts = [cat, f"{tool}_for_{cat}", api + ".json"]
        if not all(_SAFE.fullmatch(p.removesuffix(".json")) for p in parts):
            return None
        path = os.path.realpath(os.path.join(self.cache, *parts))
        if not path.startswith(self.cache + os.sep) or not os.path.isfile(path):
            return None
        try:
            records, problem = _load_cache_file(path, os.path.getmtime(path))
        except OSError as e:  # removed between isfile and getmtime
            records, problem = {}, f"cannot read it ({e.strerror or e})"
        record = records.get(str(args))
        if record is not None and not (isinstance(record, dict) and {"error", "response"} <= record.keys()):
            problem = f"the entry for {str(args)[:100]!r} is not a record with 'error' and 'response'"
        if problem:  # named under the cache folder: the client needs no more of the server's file system
            return {"error": f"response cache file {os.path.relpath(path, self.cache)}: {problem}", "response": ""}
        return record


@lru_cache(maxsize=256)
def _load_cache_file(path, mtime):
    """(records keyed by str(tool_input), "") or ({}, what is wrong with the file). Keyed by mtime: a file
    repaired (or broken) while the server runs is read again; a broken one is said once on stderr."""
    records, problem = _read_json(path)
    if not problem and not isinstance(records, dict):
        top = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(records), "a number")
        problem = f"not a JSON object of records keyed by tool input (its top level is {top})"
    if problem:
        print(f"tool server: response cache file {path}: {problem}", file=sys.stderr, flush=True)
        return {}, problem
    return records, ""


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
    """One connection. Made when it is accepted; Server calls serve() each time a request arrives."""
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection
    disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms delayed-ACK stall)
    tools = None                   # set by make_server
    timeout = 10.0                 # s per read or write on the socket (StreamRequestHandler); make_server

    def __init__(self, request, client_address, server):  # no setup() or handle() until a request comes:
        self.request, self.client_address, self.server = request, client_address, server  # an idle
        self.request.settimeout(self.timeout)  # socket costs no read buffer, a parked one no thread

    def serve(self):
        """Answer the request that has arrived and the next ones that follow within LINGER s; True: the
        connection stays open (to be parked)."""
        if not hasattr(self, "rfile"):
            self.setup()
        self.handle_one_request()
        while not self.close_connection and self._next_request(0 if self.server.ready else LINGER):
            self.handle_one_request()
        return not self.close_connection

    def _next_request(self, wait):
        """Has the next request begun (or the client left) within `wait` s? rfile's buffer is looked at
        first, which is why this handler, not a new one, serves a connection's next request."""
        sock = self.connection
        try:
            sock.settimeout(0)
            if self.rfile.peek(1):  # buffered, or arrived now (a non-blocking read)
                return True
            sock.settimeout(wait)
            sock.recv(1, socket.MSG_PEEK)  # data, or b"" when the client has left: both for handle_one_request
            return True
        except (TimeoutError, BlockingIOError):
            return False
        finally:
            sock.settimeout(self.timeout)

    def _send(self, status, obj):
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """An error that ends the connection, as JSON: http.server's own (bad request line, other methods,
        headers too long) and the framing errors of parse_request."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # an unparsed request line is taken as HTTP/0.9: no status line
        self._send(code, {"error": message or HTTPStatus(code).phrase, "response": ""})

    def parse_request(self):
        """http.server's parsing of the request line and headers, then the framing checks (the module
        docstring), then "100 Continue" if the client asked for it and the body is one we will read."""
        self.expect_100 = False
        if not super().parse_request() or not self._check_framing():
            return False
        if self.expect_100:
            super().handle_expect_100()  # sends "100 Continue"
        return True

    def handle_expect_100(self):
        """Called inside http.server's parse_request, before our framing checks: only note the request."""
        self.expect_100 = True
        return True

    def _check_framing(self):
        """True, with self.length = a POST body's length in bytes; or False after an error answer, for a
        request whose body length is in doubt (RFC 7230 Sec. 3.3.3) or that would not be read."""
        h = self.headers
        lengths = [v.strip() for field in h.get_all("Content-Length", []) for v in field.split(",")]
        n = (lengths[0].lstrip("0") or "0") if lengths else None  # "05" and "5" are one length
        if h.defects:  # "Content-Length : 5": http.client drops that line and every one after it
            error = 400, "malformed header line (not `name: value`)"
        elif "Transfer-Encoding" in h:  # any coding, any letter case
            error = (400, "both Content-Length and Transfer-Encoding") if lengths else \
                    (411, "Content-Length required (a Transfer-Encoding body is not read)")
        elif not all(_DIGITS.fullmatch(v) for v in lengths):
            error = 400, f"bad Content-Length {', '.join(map(repr, lengths))[:100]}"
        elif len({v.lstrip("0") or "0" for v in lengths}) > 1:
            error = 400, f"Content-Length values differ: {', '.join(lengths)[:100]}"
        elif self.command != "POST":
            if n not in (None, "0"):  # a body GET does not read must not be taken for the next request
                self.close_connection = True
            return True
        elif n is None:
            error = 411, "Content-Length required"
        elif len(n) > len(str(MAX_BODY)) or int(n) > MAX_BODY:  # len first: int() refuses 4,300+ digits
            error = 413, f"body of {n[:20]} bytes exceeds {MAX_BODY}"  # the body is never read
        else:
            self.length = int(n)
            return True
        self.send_error(*error)
        return False

    def _route(self):
        """The target's path, without its query; an absolute-form target (`http://host:8081/virtual`, RFC 7230
        Sec. 5.3.2, what a client sends through a proxy) routes by its path alone."""
        m = _ABSOLUTE.match(self.path)
        return (self.path[m.end():] if m else self.path).split("?")[0]

    def do_GET(self):
        if self._route() == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": f"no route {self.path}", "response": ""})

    def do_POST(self):
        if self._route() != "/virtual":
            self.close_connection = True
            return self._send(404, {"error": f"no route {self.path}", "response": ""})
        n = self.length  # checked by parse_request: plain digits, one value, at most MAX_BODY
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raw = None
        if raw is None or len(raw) < n:  # a body that stops short of its Content-Length
            self.close_connection = True
            return self._send(408, {"error": f"body shorter than its Content-Length {n}: the client stopped "
                                             f"sending for {self.timeout} s or left", "response": ""})
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nested too deep
            return self._send(400, {"error": f"malformed JSON body: {str(e)[:200]}", "response": ""})
        try:
            self._send(*self.tools.answer(body))
        except Exception as e:  # a bug in one API must not take the server down
            self._send(500, {"error": f"internal error: {type(e).__name__}: {e}", "response": ""})

    def log_message(self, *args):
        pass


def _raw_response(status, message):
    """A whole JSON error response, for a connection no handler thread has read."""
    data = json.dumps({"error": message, "response": ""}).encode()
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


class Server(HTTPServer):
    """HTTPServer whose threads serve requests, not sockets (the module docstring's "Bad input and load").
    A connection is, at any time, in exactly one place: parked in the selector thread (`_watch`),
    queued for a thread (`ready`), or in a handler thread (`_work`)."""
    request_queue_size = 128  # the listen backlog

    def __init__(self, address, handler, timeout, max_threads, max_connections):
        super().__init__(address, handler)
        self.read_timeout, self.max_threads, self.max_connections = timeout, max_threads, max_connections
        self.lock = threading.Lock()      # guards the five fields below
        self.open = self.busy = 0         # connections open; handler threads running
        self.ready = collections.deque()  # connections with a request waiting for a thread
        self.parked = []                  # connections handed to the selector thread, not yet registered
        self.closing = False
        self._wake_r, self._wake_w = socket.socketpair()  # tells the selector thread to look at `parked`
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="server-selector")
        self._watcher.start()

    def process_request(self, sock, client_address):  # the accept loop (serve_forever) calls this
        try:  # under load the request has often come with the connection: no need to park it first
            sock.settimeout(0)
            sent = sock.recv(1, socket.MSG_PEEK)
        except OSError:  # BlockingIOError: nothing yet
            sent = b""
        conn = self.RequestHandlerClass(sock, client_address, self)
        with self.lock:
            self.open += 1
        if self.open > self.max_connections:
            return self._refuse(conn, 503, f"server busy: {self.max_connections} connections open")
        self._dispatch(conn) if sent else self._park(conn)

    def _park(self, conn):
        with self.lock:
            conn.deadline = time.monotonic() + self.read_timeout
            closing, wake = self.closing, not self.parked
            self.parked.append(conn)
        if closing:
            return self._close(conn)
        if wake:
            self._wake_w.send(b"\0")

    def _watch(self):
        """The selector thread: dispatch parked connections that become readable, close the ones that
        stay silent for read_timeout, refuse the ones that waited that long for a thread."""
        sel, next_sweep = selectors.DefaultSelector(), 0.0
        sel.register(self._wake_r, selectors.EVENT_READ)
        while not self.closing:
            for key, _ in sel.select(0.1):
                if key.data is None:
                    self._wake_r.recv(4096)
                    continue
                sel.unregister(key.fileobj)
                try:
                    left = not key.fileobj.recv(1, socket.MSG_PEEK)  # b"": the client closed it
                except OSError:
                    left = True
                self._close(key.data) if left else self._dispatch(key.data)
            with self.lock:
                parked, self.parked = self.parked, []
            for conn in parked:
                sel.register(conn.request, selectors.EVENT_READ, conn)
            now = time.monotonic()
            if now < next_sweep:
                continue
            next_sweep = now + 0.1
            for key in [k for k in sel.get_map().values() if k.data and k.data.deadline < now]:
                sel.unregister(key.fileobj)
                self._close(key.data)  # the read timeout of an idle connection
            with self.lock:
                late = [c for c in self.ready if c.deadline < now]
                for c in late:
                    self.ready.remove(c)
            for conn in late:
                self._refuse(conn, 503, f"server busy: no handler thread free within {self.read_timeout} s")
        with self.lock:
            left = [k.data for k in sel.get_map().values() if k.data] + self.parked + list(self.ready)
            self.parked, self.ready = [], collections.deque()
        for conn in left:
            self._close(conn)
        sel.close()

    def _dispatch(self, conn):
        with self.lock:
            start = self.busy < self.max_threads
            if start:
                self.busy += 1
            else:
                conn.deadline = time.monotonic() + self.read_timeout
                self.ready.append(conn)
        if start:
            threading.Thread(target=self._work, args=(conn,), daemon=True).start()

    def _work(self, conn):
        """A handler thread: serve a connection's request(s), park or close it, take the next queued."""
        while conn is not None:
            try:
                alive = conn.serve()
            except Exception:
                self.handle_error(conn.request, conn.client_address)
                alive = False
            self._park(conn) if alive else self._close(conn)
            with self.lock:
                conn = self.ready.popleft() if self.ready else None
                self.busy -= conn is None

    def _refuse(self, conn, status, message):
        try:
            conn.request.settimeout(1.0)
            conn.request.sendall(_raw_response(status, message))
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn):
        try:
            if hasattr(conn, "rfile"):
                conn.finish()
        except OSError:
            pass
        self.shutdown_request(conn.request)
        with self.lock:
            self.open -= 1

    def handle_error(self, request, client_address):
        """A failed connection (a client's reset, a broken pipe) is one line; a bug keeps its traceback."""
        e = sys.exc_info()[1]
        if not isinstance(e, OSError):
            return super().handle_error(request, client_address)
        print(f"tool server: connection from {client_address[0]}:{client_address[1]}: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)

    def server_close(self):
        super().server_close()
        with self.lock:
            closed, self.closing = self.closing, True
        if not closed:  # the selector thread closes the connections it holds, then itself
            self._wake_w.send(b"\0")
            self._watcher.join(2)
            self._wake_r.close()
            self._wake_w.close()


def make_server(host="127.0.0.1", port=0, cache=None, queries=(), timeout=10.0, max_threads=64,
                max_connections=512):
    """A Server bound to host:port (0 = a free port); `.url` is its address. Raises ConfigError for a
    bad query file, cache folder or limit, before anything listens."""
    for name, value in (("timeout", timeout), ("max_threads", max_threads), ("max_connections", max_connections)):
        if not 0 < value < float("inf"):
            raise ConfigError(f"{name} must be > 0 and finite, got {value}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be in 0..65535, got {port}")
    handler = type("BoundHandler", (Handler,), {"tools": ToolServer(cache, queries), "timeout": timeout})
    srv = Server((host, port), handler, timeout, max_threads, max_connections)
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
    ap.add_argument("--timeout", type=float, default=10.0, help="s a connection may stay silent (per read/write)")
    ap.add_argument("--max-threads", type=int, default=64, help="requests served at once; more wait for a thread")
    ap.add_argument("--max-connections", type=int, default=512, help="open connections; more get 503")
    a = ap.parse_args()
    try:
        srv = make_server(a.host, a.port, a.cache, a.queries, a.timeout, a.max_threads, a.max_connections)
    except ConfigError as e:
        print(f"server.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the port is taken, the address is not ours
        print(f"server.py: error: cannot listen on {a.host}:{a.port}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    print(f"tool server on {srv.url}/virtual ({len(srv.RequestHandlerClass.tools.simulated)} simulated APIs)",
          flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
