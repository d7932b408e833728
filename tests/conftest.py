"""Shared test setup: the repo root on sys.path, one loopback tool server, the committed tasks."""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import formats, models  # noqa: E402
from harness import server  # noqa: E402

# The test models are tiny: one thread is ~100x faster than OpenMP threads spin-waiting on a busy
# 2-core machine, and never slower.
torch.set_num_threads(1)

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
STB_QUERIES = os.path.join(FIXTURES, "stb_queries.json")  # our own StableToolBench-format queries
SHARED = os.path.join(os.path.dirname(ROOT), "shared")     # reference data; absent in a user's clone


@pytest.fixture(scope="session")
def tool_server():
    """One embedded-benchmark server on an ephemeral loopback port, for the whole session."""
    srv = server.start_in_thread(port=0)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def test_tasks():
    return formats.load_tasks(os.path.join(ROOT, "data", "bench_test.json"))


@pytest.fixture(scope="session")
def val_tasks():
    return formats.load_tasks(os.path.join(ROOT, "data", "bench_val.json"))


@pytest.fixture(scope="session")
def train_tasks():
    return formats.load_tasks(os.path.join(ROOT, "data", "bench_train.json"))


@pytest.fixture(scope="session")
def tiny_tok():
    """The tiny model's BPE tokenizer, trained once per session (~3 s)."""
    from harness import models
    return models.tiny_tokenizer()


SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


@pytest.fixture
def make_policy(tiny_tok):
    """make_policy(seed, lora_dropout=0.0, full_finetune=False) -> a ~0.2 M-parameter Policy, built as
    load_policy builds one (LoRA r=4 on every projection), with the session's tokenizer."""
    import policy as P
    import torch

    def make(seed=0, lora_dropout=0.0, full_finetune=False):
        model, tok = models.build_tiny(seed, tok=tiny_tok, **SMALL)
        model.config.use_cache = False
        lora = None if full_finetune else dict(r=4, alpha=8, dropout=lora_dropout, targets=list(P.LORA_TARGETS))
        if lora:
            model.requires_grad_(False)
            P.inject_lora(model, lora["r"], lora["alpha"], lora["dropout"], tuple(lora["targets"]))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return P.Policy(model, tok, "tiny", lora, full_finetune)
    return make


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, tiny_tok):
    """A ~0.2 M-parameter Qwen2 (SMALL) and its tokenizer, written by save_pretrained: the --model DIR path."""
    d = str(tmp_path_factory.mktemp("model"))
    model, tok = models.build_tiny(0, tok=tiny_tok, **SMALL)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


class FakeOpenAI(BaseHTTPRequestHandler):
    """A fake OpenAI-compatible endpoint: POST /v1/chat/completions answered by server.behave(n, body) ->
    (status, reply object or bytes, delay), n counting requests from 1; server.seen keeps each request's
    path, body and Authorization header, server.bodies its body alone."""
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        self.server.bodies.append(body)
        status, reply, delay = self.server.behave(len(self.server.seen), body)
        time.sleep(delay)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_openai():
    """start(behave) -> (server, its /v1 URL) on a loopback port; every server stops after the test."""
    servers = []

    def start(behave):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
        srv.daemon_threads, srv.behave, srv.seen, srv.bodies = True, behave, [], []
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()
