"""The tool server's client: StableToolBench's protocol over HTTP (POST /virtual, GET /health).

env.ToolEnv.step calls `client.call(category, tool_name, api_name, arguments)` and gets the server's
{"error": ..., "response": ...}; env.step_all runs many episodes' calls at once through `client.map`.
Connection errors and 5xx answers are retried with backoff; a server that stays away is a
ToolServerError, which steptool.py turns into one line naming the checkpoint to resume from.
"""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import requests


class ToolServerError(RuntimeError):
    """No tool server answers: check() found none, or call() ran out of retries."""


class ToolClient:
    """POSTs calls to a StableToolBench-compatible server; retries connection errors and 5xx."""

    def __init__(self, url, timeout=30.0, retries=3, backoff=0.5, workers=16):
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff
        self.pool, self.local = ThreadPoolExecutor(workers), threading.local()  # local: a requests.Session per thread

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
                                  f"`python -m harness.server` or pass --tool-server URL") from None

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
