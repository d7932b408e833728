"""Load test of the tool server (server.py): many clients, keep-alive or not, with idle sockets held open.

    python -m harness.server_bench         # 64 clients x 50 requests, a new connection per request;
                                           # then 16 clients x 300 on one keep-alive connection each;
                                           # 300 idle sockets opened first and held open
    python -m harness.server_bench --clients 4 --requests 5 --keepalive-clients 2 --keepalive-requests 10 --idle 5
    python -m harness.server_bench --rounds 3   # the same again on the same server: does RSS keep growing?

The server runs as a separate process (`python -m harness.server --port 0 --timeout T`) on a loopback
ephemeral port; the clients are threads of this process, each request a POST /virtual of one
embedded-world call (http.client). A request is an error when it raises (a reset, a refused or
timed-out connection) or its answer is anything but HTTP 200 with the world's record; latency is
per request, connect included. The idle sockets connect and never send: the server closes them
after its --timeout, which the script waits for (a phase longer than T runs partly without them).
Server threads and RSS come from /proc/<pid>/status (Linux): before (after one warm-up request),
the peak during each phase (sampled every 20 ms), and after the idle sockets are closed and the
clients have left; CPU seconds of the server and of this process per phase from /proc/<pid>/stat.
One line per figure group, a `target:` line per round, and one JSON object of everything last.

Bounded: at most --max-seconds of requests per round (unsent ones count as errors), 30 s per request.
"""
import argparse
import collections
import http.client
import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time

from harness import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = world.World()
CITY = W.split["city"]["test"][0]
BODY = json.dumps({"category": "Weather", "tool_name": "SkyCast", "api_name": "forecast",
                   "tool_input": json.dumps({"city": CITY}), "strip": "", "toolbench_key": ""})
EXPECTED = json.loads(json.dumps(world.call_api(W, "SkyCast", "forecast", {"city": CITY})))
HEADERS = {"Content-Type": "application/json"}


def proc_status(pid):
    """(threads, RSS in MiB) of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        s = f.read()
    field = lambda name: int(re.search(rf"^{name}:\s+(\d+)", s, re.M).group(1))
    return field("Threads"), field("VmRSS") / 1024


def cpu_seconds(pid):
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Peak(threading.Thread):
    """Samples the server's threads and RSS every 20 ms while a phase runs; keeps the maxima."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.threads, self.rss, self.done = pid, 0, 0.0, threading.Event()

    def run(self):
        while not self.done.wait(0.02):
            t, r = proc_status(self.pid)
            self.threads, self.rss = max(self.threads, t), max(self.rss, r)


def phase(port, clients, requests, keepalive, deadline, pid):
    """clients threads x requests POSTs; keepalive: one connection per client, else one per request."""
    latencies, errors, lock = [], collections.Counter(), threading.Lock()
    go = threading.Barrier(clients + 1)

    def client():
        conn, mine, bad = None, [], collections.Counter()
        go.wait()
        for i in range(requests):
            if time.monotonic() > deadline:
                bad["not sent (--max-seconds)"] += requests - i
                break
            t0 = time.perf_counter()
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/virtual", BODY, HEADERS)
                r = conn.getresponse()
                data = r.read()
                err = None if r.status == 200 and json.loads(data) == EXPECTED else f"HTTP {r.status} or a wrong record"
            except (OSError, http.client.HTTPException, ValueError) as e:
                err = type(e).__name__
            mine.append(time.perf_counter() - t0)
            if err:
                bad[err] += 1
            if err or not keepalive:
                conn.close()
                conn = None
        if conn:
            conn.close()
        with lock:
            latencies.extend(mine)
            errors.update(bad)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    peak = Peak(pid)
    peak.start()
    go.wait()
    t0, cpu0, mine0 = time.perf_counter(), cpu_seconds(pid), cpu_seconds(os.getpid())
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    cpu, mine = cpu_seconds(pid) - cpu0, cpu_seconds(os.getpid()) - mine0
    peak.done.set()
    peak.join()
    lat = sorted(latencies) or [float("nan")]
    ms = lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1)
    return {"requests": len(latencies), "errors": sum(errors.values()), "error_kinds": dict(errors),
            "req_per_s": round(len(latencies) / dt, 1), "p50_ms": ms(0.50), "p99_ms": ms(0.99),
            "max_ms": round(1000 * lat[-1], 1), "seconds": round(dt, 2),
            "server_cpu_s": round(cpu, 2), "client_cpu_s": round(mine, 2),
            "server_threads_peak": peak.threads, "server_rss_mib_peak": round(peak.rss, 1)}


def load_round(a, port, pid, before, log):
    """K idle sockets opened; the two phases; the idle sockets closed by the server; the after figures."""
    out, t_idle = {}, time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(a.idle)]
    try:
        time.sleep(0.2)
        t, r = proc_status(pid)
        out["idle_open"] = {"sockets": len(idle), "server_threads": t, "server_rss_mib": round(r, 1)}
        print(f"idle: {len(idle)} sockets open; server threads {t}, RSS {r:.1f} MiB", flush=True)
        deadline = time.monotonic() + a.max_seconds
        for name, n, m, keep in (("new_connection", a.clients, a.requests, False),
                                 ("keep_alive", a.keepalive_clients, a.keepalive_requests, True)):
            res = out[name] = phase(port, n, m, keep, deadline, pid)
            print(f"{name}: {n} clients x {m} = {res['requests']} requests, {res['errors']} errors"
                  f"{' ' + str(res['error_kinds']) if res['errors'] else ''}, {res['req_per_s']:.0f} req/s, "
                  f"latency p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, max {res['max_ms']} ms; during: "
                  f"server threads peak {res['server_threads_peak']}, RSS peak {res['server_rss_mib_peak']:.1f} MiB; "
                  f"CPU in {res['seconds']} s: server {res['server_cpu_s']} s, clients {res['client_cpu_s']} s",
                  flush=True)
        # The idle sockets: wait until the server has closed each (EOF), at most its timeout + 5 s.
        left, closed = list(idle), 0
        while left and time.monotonic() < t_idle + a.server_timeout + 5:
            for s in select.select(left, [], [], 0.2)[0]:
                try:
                    closed += s.recv(1) == b""
                except OSError:  # a reset counts as closed too
                    closed += 1
                left.remove(s)
        out["idle_closed_by_server"], out["idle_closed_after_s"] = closed, round(time.monotonic() - t_idle, 1)
    finally:
        for s in idle:
            s.close()
    time.sleep(0.5)  # the server's selector thread sees the last clients leave
    t, r = proc_status(pid)
    out["after"] = {"server_threads": t, "server_rss_mib": round(r, 1)}
    log.seek(0)
    out["server_stderr_lines"] = len(log.read().splitlines())
    print(f"idle: {closed}/{a.idle} sockets closed by the server (--timeout {a.server_timeout}) within "
          f"{out['idle_closed_after_s']} s of opening", flush=True)
    print(f"after: server threads {t}, RSS {r:.1f} MiB (before: {before['server_threads']}, "
          f"{before['server_rss_mib']:.1f} MiB); server stderr lines so far: {out['server_stderr_lines']}", flush=True)
    errors = out["new_connection"]["errors"] + out["keep_alive"]["errors"]
    worst = max(out["new_connection"]["max_ms"], out["keep_alive"]["max_ms"])
    print(f"target (0 errors, max latency < 250 ms, threads and RSS back to before): {errors} errors, "
          f"max {worst} ms, threads {t} vs {before['server_threads']}, RSS {r - before['server_rss_mib']:+.1f} MiB",
          flush=True)
    return out


def main(a):
    log = tempfile.TemporaryFile("w+")  # the server's stderr: a pipe nobody reads could fill and block it
    proc = subprocess.Popen([sys.executable, "-u", "-m", "harness.server", "--port", "0",
                             "--timeout", str(a.server_timeout)], stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/virtual", line)
        if not m:
            log.seek(0)
            sys.exit(f"harness.server_bench: the server did not start: {line}{log.read()[-500:]}")
        port = int(m.group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # the warm-up request
        conn.request("POST", "/virtual", BODY, HEADERS)
        conn.getresponse().read()
        conn.close()
        time.sleep(0.5)
        t, r = proc_status(proc.pid)
        out = {"machine": f"{os.cpu_count()} CPUs", "server_timeout_s": a.server_timeout,
               "before": {"server_threads": t, "server_rss_mib": round(r, 1)}}
        print(f"server pid {proc.pid} on 127.0.0.1:{port}; before: threads {t}, RSS {r:.1f} MiB", flush=True)
        for k in range(a.rounds):
            out[f"round_{k + 1}"] = load_round(a, port, proc.pid, out["before"], log)
        print(json.dumps(out))
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="load test of server.py (loopback only)")
    ap.add_argument("--clients", type=int, default=64, help="clients with a new connection per request")
    ap.add_argument("--requests", type=int, default=50, help="requests per such client")
    ap.add_argument("--keepalive-clients", type=int, default=16, help="clients with one keep-alive connection each")
    ap.add_argument("--keepalive-requests", type=int, default=300, help="requests per keep-alive client")
    ap.add_argument("--idle", type=int, default=300, help="idle sockets held open (connected, never sending)")
    ap.add_argument("--server-timeout", type=float, default=10.0, help="the server's --timeout, in s")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop sending after this long (per round)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat idle sockets + both phases on the same server")
    a = ap.parse_args()
    for k in ("clients", "requests", "keepalive_clients", "keepalive_requests", "rounds"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    if a.idle < 0 or not a.server_timeout > 0 or not a.max_seconds > 0:
        ap.error("--idle must be >= 0, --server-timeout and --max-seconds > 0")
    main(a)
