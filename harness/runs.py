"""Run folders: where a run writes, so that it never writes over, or deletes, what it did not write.

    run = runs.claim("runs/x", "steptool", overwrite=False, resume=False, entries=("metrics.jsonl", ...))
    run.register("G1.json")                   # a name not known at the claim: registered before writing it
    ...
    run.release()                             # or: with run: ...

A folder that a run of ours writes carries a marker, `.steptool-run.json` =
{"kind": "steptool" | "sft" | "eval" | "compare", "entries": [top-level names the run writes]}. A
name is registered before it is written, so the list is always a superset of what is there, and
claim() decides from the marker alone:
    no folder, or an empty one        created and claimed
    our marker, the same kind         resume: continue; overwrite: delete the listed entries (refused,
                                      naming them, if the folder also holds anything else); else refused
    anything else                     refused, overwrite or not: we never delete what we did not write
One exception: `adopt` (steptool.py --resume, once a readable checkpoint is found in the folder)
takes over a folder without a marker whose every name is one of `entries`: a run written before
markers existed. Nothing else is ever adopted.
`inputs`: paths the run reads (its --model); --overwrite is refused if one lies inside the folder.
A second run on the same folder stops at once: `DIR/.lock` is held with flock for the whole run, on
a file descriptor kept open, holding the pid. The kernel drops an flock when its process dies, so a
killed run never leaves a stale lock; a second claim in the same process is refused too (flock
locks belong to an open file, not to a process).

Checkpoints: write_dir() writes a folder under a temporary name and renames it into place;
models.save_checkpoint() writes the policy and a state.pt of tensors, numbers, strings and containers
only, read back by load_state() with torch.load(weights_only=True), so a crafted state.pt cannot
run code: it is refused, unread, with one line naming the file.

Errors are RunError: one line, naming the flag and the folder; the command-line entry points print
it and exit with status 2 (fail()), before any model is loaded.

Departures: none from the paper, which says nothing about run folders. Shortcuts:
1. flock is advisory: only our runs honour it, and over NFS it is as good as the server's locking.
2. The marker lists top-level names only; what is inside a listed folder is the run's.
"""
import fcntl
import json
import os
import random
import shutil
import sys

import numpy as np
import torch

MARKER, LOCK = ".steptool-run.json", ".lock"


class RunError(Exception):
    """A folder we may not write, or a checkpoint we cannot read: a one-line message for the user."""


def interruptible(prog, main, after=""):
    """Run a command line's main(): Ctrl-C or SIGTERM ends it in one line on stderr (what was kept:
    `after`), exit status 130, no traceback; the folders it claimed are released by their `with`."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f"; {after}" if after else ""), file=sys.stderr)
        sys.exit(130)


def plain_name(name, what):
    """`name` if it can be a file name inside a folder (formats.plain_name's rule: a printable string with
    no '/', not '.' or '..', at most 200 bytes); else a RunError naming `what`."""
    from harness import formats
    return formats.plain_name(name, f"{what}:", RunError)


def fail(prog, err):
    """The command-line end of a RunError: one line on stderr, exit status 2."""
    print(f"{prog}: {err}", file=sys.stderr)
    sys.exit(2)


def read_marker(path):
    """The folder's marker as a dict, or None without one; an unreadable marker is a RunError."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            m = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunError(f"{path}/{MARKER}: unreadable ({e}); not touching the folder") from None
    if not (isinstance(m, dict) and isinstance(m.get("kind"), str) and isinstance(m.get("entries"), list)):
        raise RunError(f"{path}/{MARKER}: not a marker of ours; not touching the folder")
    return m


def _write_marker(path, kind, entries):
    tmp = os.path.join(path, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"kind": kind, "entries": entries}, f, indent=1)
    os.replace(tmp, os.path.join(path, MARKER))  # whole or absent, never half a marker


def _contents(path, locked=False):
    """What the folder holds besides our bookkeeping (the marker, its temporary name, and the lock of a
    folder with our marker or that we hold: a `.lock` of someone else's is content like any other file)."""
    ours = locked or os.path.isfile(os.path.join(path, MARKER))
    return sorted(n for n in os.listdir(path) if not (ours and n == LOCK) and not n.startswith(MARKER))


def _names(names):
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _remove(p):
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.unlink(p)                  # a file, or a link: the link goes, never what it points to


class Run:
    """A claimed run folder: its kind, the names it writes, and its lock until release()."""

    def __init__(self, path, kind, entries, fd):
        self.path, self.kind, self.entries, self._fd = path, kind, list(entries), fd

    def register(self, *names):
        """Add top-level names to the marker before they are written (the manifest stays a superset).
        Each must be a plain name (plain_name): a name that would reach outside the folder is refused."""
        for n in names:
            plain_name(n, f"{self.path}: a file name")
            if n in (MARKER, LOCK):
                raise RunError(f"{self.path}: {n!r} is the run folder's own bookkeeping; not written")
        new = [n for n in dict.fromkeys(names) if n not in self.entries]
        if new:
            self.entries += new
            _write_marker(self.path, self.kind, self.entries)

    def path_of(self, name):
        """The path of a top-level entry, registered first; refused unless it stays inside the folder."""
        self.register(name)
        p = os.path.join(self.path, name)
        if os.path.dirname(os.path.realpath(p)) != os.path.realpath(self.path):
            raise RunError(f"{self.path}: {name!r} resolves outside the folder ({os.path.realpath(p)}); not written")
        return p

    def release(self):
        if self._fd is not None:
            os.close(self._fd)        # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _foreign(path, kind, adopt, entries, locked=False):
    """Why the folder is not ours to write (a one-line reason), or None."""
    m = read_marker(path)
    if m is None:
        others = _contents(path, locked)
        if others and not (adopt and set(others) <= set(entries)):
            return f"not empty ({_names(others)}) and not a run folder of ours"
    elif m["kind"] != kind:
        return f"holds a {m['kind']} run of ours, not a {kind} one"
    return None


def _lock(path, where):
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunError(f"{where}: another run (pid {pid}) is writing {path}; wait for it to end or choose another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def claim(path, kind, flag="--output", overwrite=False, resume=False, entries=(), adopt=False, inputs=()):
    """Claim `path` for a run of `kind` (see the module docstring) -> a locked Run, or RunError.

    entries: the top-level names the run will write, registered now; more with Run.register."""
    where = f"{flag} {path}"
    if os.path.lexists(path) and not os.path.isdir(path):
        raise RunError(f"{where}: exists and is not a folder")
    inside = [p for p in inputs if p and os.path.exists(p) and
              os.path.commonpath([os.path.realpath(p), os.path.realpath(path)]) == os.path.realpath(path)]
    if overwrite and inside:
        raise RunError(f"{where} --overwrite: it holds {inside[0]}, which this run reads; nothing was deleted; "
                       "write the new run to another folder")
    made = _make_dirs(path, where)
    try:
        return _claim(path, kind, where, overwrite, resume, entries, adopt)
    except OSError as e:        # a read-only folder, a full disk: one line; the folders made for it go again
        _remove_made(made)
        raise RunError(f"{where}: cannot write {e.filename or path}: {os.strerror(e.errno) if e.errno else e}") from None
    except RunError:
        _remove_made(made)
        raise


def _make_dirs(path, where):
    """os.makedirs, listing the folders it made (deepest first); a failure (a name too long, a read-only
    file system, no space) is one RunError naming the path and the reason, with nothing left behind."""
    made, p = [], os.path.abspath(path)
    while not os.path.isdir(p):
        made.append(p)
        p = os.path.dirname(p)
    try:
        for d in reversed(made):
            os.mkdir(d)
    except OSError as e:
        _remove_made(made)
        raise RunError(f"{where}: cannot create {e.filename or path}: {os.strerror(e.errno) if e.errno else e}") from None
    return made


def _remove_made(made):
    for d in made:               # deepest first; a folder someone else filled meanwhile stays
        try:
            os.rmdir(d)
        except OSError:
            pass


def _claim(path, kind, where, overwrite, resume, entries, adopt):
    why = _foreign(path, kind, adopt, entries)
    if why:      # refused before touching anything: not even a lock file goes into someone else's folder
        raise RunError(f"{where}: {why}; nothing was written or deleted" +
                       (" (--overwrite replaces only a run of ours)" if overwrite else "") + "; choose another folder")
    fd = _lock(path, where)
    try:
        why = _foreign(path, kind, adopt, entries, locked=True)  # again, under the lock: it may have changed
        if why:
            raise RunError(f"{where}: {why}; nothing was written or deleted; choose another folder")
        m = read_marker(path)
        if m is None:                                            # a new (or adopted) folder: its marker now
            m = {"kind": kind, "entries": []}
            _write_marker(path, kind, [])
        others = _contents(path, locked=True)
        if others and not resume:
            if not overwrite:
                resumable = kind == "steptool" and any(os.path.isfile(os.path.join(path, n, "state.pt"))
                                                       for n in ("checkpoint", "checkpoint.old"))
                raise RunError(f"{where}: holds an earlier {kind} run; " +
                               (f"continue it with --resume {path}, or " if resumable else
                                "it saved no checkpoint to continue from; " if kind == "steptool" else "") +
                               "replace it with --overwrite")
            foreign = [n for n in others if n not in m["entries"]]
            if foreign:
                raise RunError(f"{where} --overwrite: the folder also holds {_names(foreign)}, which no run of ours "
                               "wrote; nothing was deleted; move those away or choose another folder")
            for n in others:                                     # the marker lists them until they are gone
                _remove(os.path.join(path, n))
            m["entries"] = []
            _write_marker(path, kind, [])
        run = Run(path, kind, m["entries"], fd)
        run.register(*entries)
        return run
    except BaseException:
        os.close(fd)
        raise


# ---- folders written whole: a temporary name, then a rename ------------------------------------
def replace_dir(tmp, path):
    """Move the complete folder `tmp` to `path`; the old `path` survives (as path.old) until the new
    one is in place, so a crash leaves one whole copy (find_checkpoint looks at both)."""
    old = path + ".old"
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def written_whole(*names):
    """The top-level names a folder written by write_dir() occupies: itself, its temporary and old names."""
    return [n + suffix for n in names for suffix in ("", ".tmp", ".old")]


def write_dir(path, write):
    """write(tmp) fills path.tmp; then it replaces `path` whole. Registers nothing: the caller has.
    A write that fails (no space, a read-only file system) leaves no path.tmp behind and is a RunError
    saying why; `path` is as it was."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)    # our own leftover of a crash
    try:
        write(tmp)
        replace_dir(tmp, path)
    except (OSError, RuntimeError) as e:      # torch.save reports a full disk as a RuntimeError
        why = write_failure(e, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"writing {path} failed: {why}") from None


def write_failure(e, path, low=64 << 20):
    """Why a write failed, in words: the errno's meaning, or (an error without one, as torch.save's
    'unexpected pos') a full disk when the file system holding `path` has under `low` bytes free."""
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno) + (f" ({e.filename})" if e.filename else "")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return first
    return f"no space left on device ({free >> 20} MB free; {first})" if free < low else first


def write_file(path, write, binary=False):
    """A file written whole: write(f) (or, binary, write(tmp_path)) fills path.tmp, then a rename."""
    tmp = path + ".tmp"
    try:
        if binary:
            write(tmp)
        else:
            with open(tmp, "w") as f:
                write(f)
        os.replace(tmp, path)
    except OSError as e:                      # no space, a read-only file system: one line, no .tmp left
        why = write_failure(e, path)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RunError(f"writing {path} failed: {why}") from None


def install(run, write, last):
    """Write a folder's worth of entries into the run folder itself (sft.py's checkpoint is DIR): into a
    hidden temporary sub-folder first, then each entry moved in, `last` last, so a crash never leaves
    a half that loads (load_policy looks for policy.json; transformers for config.json)."""
    tmp = os.path.join(run.path, ".partial")
    run.register(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    before = set(run.entries)
    names = sorted(os.listdir(tmp), key=lambda n: n == last)
    appeared = [n for n in names if n not in before and os.path.lexists(os.path.join(run.path, n))]
    if appeared:                              # written by someone else while we ran: not ours to replace
        raise RunError(f"{run.path}: {_names(appeared)} appeared during the run; not replaced (the result is in {tmp})")
    run.register(*names)
    for n in names:
        dst = os.path.join(run.path, n)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)                # ours: listed before this install
        os.replace(os.path.join(tmp, n), dst)
    os.rmdir(tmp)


# ---- checkpoints -------------------------------------------------------------------------------
def find_checkpoint(run_dir):
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        if os.path.isfile(os.path.join(run_dir, name, "state.pt")):
            return os.path.join(run_dir, name)
    raise FileNotFoundError(f"--resume {run_dir}: no checkpoint in it")


def load_state(ckpt):
    """state.pt read with weights_only=True: tensors, numbers, strings and containers, nothing run.
    Anything else (a crafted pickle, a checkpoint older than this format) is a one-line RunError."""
    path = os.path.join(ckpt, "state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever the unpickler raises, nothing in the file was run
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        why = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
        raise RunError(f"{path}: refused, not read: not a state.pt of ours ({why[:200]})") from None


def rng_state():
    """torch, numpy and Python RNG states as tensors, ints, floats and strings: weights_only loads them."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))
