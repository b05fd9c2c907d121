"""Builds of one token store that can run at once: own directories, one atomic publish.

Layout of `<store_dir>/<split>/`:
  manifest.json   the published build: its manifest plus "build": "builds/<id>". Created
                  exclusively, once, after every shard of that build is written; never
                  rewritten in place (`--overwrite` replaces it with one rename).
  builds/<id>/    one build's files: its shards and its own manifest.json; while it runs
                  also _tmp/, progress/ and heartbeat.json (host, pid, time; refreshed every
                  HEARTBEAT_S by the build's driver).
  logs/<id>.log   Beam's own log of a build of a local store (remote: the local temp dir;
                  data_pipelines/store_job.py).

A build writes only into its own directory, so no build can remove another's files.
Publishing is the exclusive create of manifest.json: on local disks a hard link of a
complete temporary file (atomic; fails when the name exists); on the other tf.io.gfile
schemes rename(overwrite=False), which checks, then renames: atomic within one process (as
ram:// is), while on gs:// two builds that finish within one round trip of each other can
both succeed; then the later manifest stands and the other build keeps its files, removed
later as a dead build's. A build that finds the store published keeps the published one and
removes its own directory. Readers open only a published manifest's build, so a rebuild
never changes what a reader reads. Stores of the old layout (shards next to a manifest
without "build") are read as before.

Leftovers: each build first removes the directories of builds that are provably dead (same
host and its process is gone, or no heartbeat for stale_after_s, 5 min) and lists the live
ones; a build replaced by --overwrite is kept for retain_s (1 h) for the readers that have
it open. Before publishing, a build checks that its own files are all there (a build paused
for longer than stale_after_s may have been taken for dead).
"""
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from doremi_jax import store

BUILDS = "builds"
HEARTBEAT = "heartbeat.json"
PROGRESS = "progress"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 300.0  # a running build without heartbeat for this long is dead (any host)
RETAIN_S = 3600.0  # a build replaced by --overwrite stays readable this long
WAIT_TIMEOUT_S = 7200.0  # a process waiting for another's build gives up after this long
_PUBLISH_LOCK = threading.Lock()  # makes check-then-rename atomic within a process (ram://)

# ------------------------------------------------------------------ builds


def new_build_id() -> str:
  return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"


def build_dir(split_dir: str, build_id: str) -> str:
  return os.path.join(split_dir, BUILDS, build_id)


def read_json(path: str) -> Optional[dict]:
  """The file's JSON, or None when it is missing or not yet whole."""
  try:
    with store.open_file(path, "rb") as f:
      return json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError):
    return None
  except Exception as e:  # pylint: disable=broad-except  (tf.errors.NotFoundError)
    if type(e).__name__ == "NotFoundError":
      return None
    raise


def write_heartbeat(bdir: str, state: str = "building") -> None:
  store.makedirs(bdir)
  beat = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "state": state}
  store.write_atomic(os.path.join(bdir, HEARTBEAT), json.dumps(beat).encode())


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:  # a killed child not yet reaped is a zombie: dead
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def build_state(bdir: str, stale_after_s: float, retain_s: float = RETAIN_S) -> dict:
  """{"dir", "beat", "age_s", "dead", "why"} of one build directory."""
  beat = read_json(os.path.join(bdir, HEARTBEAT))
  age = time.time() - float(beat["time"]) if beat else None
  if beat is None and not store.is_remote(bdir) and os.path.exists(bdir):
    age = time.time() - os.path.getmtime(bdir)
  st = {"dir": bdir, "beat": beat, "age_s": age, "dead": False, "why": ""}
  limit = retain_s if beat and beat.get("state") == "retired" else stale_after_s
  if (beat and beat.get("state") == "building" and beat.get("host") == socket.gethostname() and
      not _pid_alive(int(beat["pid"]))):
    st.update(dead=True, why=f"its process {beat['pid']} on this host is gone")
  elif age is not None and age > limit:
    st.update(dead=True, why=f"no heartbeat for {age:.0f}s > {limit:.0f}s")
  return st


def list_builds(split_dir: str) -> list[str]:
  root = os.path.join(split_dir, BUILDS)
  if not store.exists(root):
    return []
  names = store.gfile().listdir(root) if store.is_remote(root) else os.listdir(root)
  return sorted(n.rstrip("/") for n in names)


def describe(states) -> str:
  out = []
  for st in states:
    beat = st["beat"] or {}
    age = "no heartbeat yet" if st["age_s"] is None else f"heartbeat {st['age_s']:.0f}s ago"
    out.append(f"{st['dir']} (host {beat.get('host', '?')}, pid {beat.get('pid', '?')}, "
               f"{beat.get('state', 'building')}, {age})")
  return "; ".join(out) or "none"


def other_builds(split_dir: str, published: Optional[str], stale_after_s: float,
                 retain_s: float = RETAIN_S) -> list[dict]:
  """States of the build directories other than the published one."""
  return [
      build_state(build_dir(split_dir, n), stale_after_s, retain_s)
      for n in list_builds(split_dir)
      if f"{BUILDS}/{n}" != published
  ]


def clean_dead(split_dir: str, published: Optional[str], stale_after_s: float,
               echo: Callable[[str], None], retain_s: float = RETAIN_S) -> list[dict]:
  """Removes dead builds' directories; returns the states of the live ones."""
  live = []
  if os.path.isdir(split_dir):  # a killed publish's temporary file (local disks)
    for n in os.listdir(split_dir):
      path = os.path.join(split_dir, n)
      if n.startswith(f".{store.MANIFEST}.tmp-") and time.time() - os.path.getmtime(path) > 600:
        os.remove(path)
  for st in other_builds(split_dir, published, stale_after_s, retain_s):
    if st["dead"]:
      store.remove_tree(st["dir"])
      echo(f"Removed a dead build's files: {st['dir']} ({st['why']}).")
    else:
      live.append(st)
  return live


class Heartbeat:
  """Refreshes a build's heartbeat every HEARTBEAT_S and calls tick() every tick_s."""

  def __init__(self, bdir: str, tick: Optional[Callable[[], None]] = None, tick_s: float = 2.0,
               beat_s: float = HEARTBEAT_S):
    self._bdir, self._tick, self._tick_s, self._beat_s = bdir, tick, tick_s, beat_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True, name="store-heartbeat")

  def __enter__(self):
    write_heartbeat(self._bdir)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()

  def _loop(self):
    last = time.monotonic()
    while not self._stop.wait(self._tick_s):
      try:
        if time.monotonic() - last >= self._beat_s:
          write_heartbeat(self._bdir)
          last = time.monotonic()
        if self._tick is not None:
          self._tick()
      except Exception as e:  # pylint: disable=broad-except  (a missed beat is not fatal)
        logging.warning("Store heartbeat of %s: %s", self._bdir, e)


# ----------------------------------------------------------------- publish


def create_exclusive(path: str, data: bytes) -> bool:
  """Writes `path` whole, only if it does not exist; False when it does."""
  tmp = store.tmp_name(path)
  with store.open_file(tmp, "wb") as f:
    f.write(data)
  try:
    if not store.is_remote(path):
      try:
        os.link(tmp, path)
      except FileExistsError:
        return False
      return True
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with _PUBLISH_LOCK:
      if store.exists(path):
        return False
      try:
        tf.io.gfile.rename(tmp, path, overwrite=False)
      except tf.errors.AlreadyExistsError:
        return False
      return True
  finally:
    if store.exists(tmp):
      store.gfile().remove(tmp) if store.is_remote(tmp) else os.remove(tmp)


def check_own_files(bdir: str, manifest: dict) -> None:
  """StoreBuildError unless the build's heartbeat and every shard are still there."""
  names = set(store.gfile().listdir(bdir) if store.is_remote(bdir) else os.listdir(bdir))
  want = {s["file"] for d in manifest["per_domain"].values() for s in d["shards"]} | {HEARTBEAT}
  if not want <= {n.rstrip("/") for n in names}:
    raise store.StoreBuildError(
        f"Files of this build in {bdir} were removed while it ran (it was taken for dead: no "
        f"heartbeat for over {STALE_AFTER_S:.0f}s, e.g. while paused); rerun the build.")


def publish(split_dir: str, manifest: dict, *, replace: bool) -> tuple[dict, bool]:
  """(the manifest published now, whether it is ours); replace: --overwrite."""
  path = os.path.join(split_dir, store.MANIFEST)
  data = json.dumps(manifest, indent=1, sort_keys=True).encode()
  if replace:
    store.write_atomic(path, data)
    created = True
  else:
    created = create_exclusive(path, data)
  return read_json(path), created


# ---------------------------------------------------------------- progress


def progress_dir(bdir: str) -> str:
  return os.path.join(bdir, PROGRESS)


def write_progress(pdir: str, unit: str, docs: int, done_bytes: int, done: bool) -> None:
  store.makedirs(pdir)
  store.write_atomic(
      os.path.join(pdir, f"{unit}.json"),
      json.dumps({
          "docs": docs,
          "bytes": done_bytes,
          "done": done
      }).encode())


def read_progress(pdir: str) -> dict:
  """{"docs", "bytes", "units_done"} summed over the workers' progress files."""
  total = {"docs": 0, "bytes": 0, "units_done": 0}
  if not store.exists(pdir):
    return total
  names = store.gfile().listdir(pdir) if store.is_remote(pdir) else os.listdir(pdir)
  for n in names:
    if n.endswith(".json"):
      p = read_json(os.path.join(pdir, n)) or {}
      total["docs"] += int(p.get("docs", 0))
      total["bytes"] += int(p.get("bytes", 0))
      total["units_done"] += int(bool(p.get("done")))
  return total


# -------------------------------------------------------------------- wait


def live_builds(split_dir: str) -> list[dict]:
  """States of the builds running now (heartbeat fresh, process not known dead)."""
  return [
      st for st in other_builds(split_dir, None, STALE_AFTER_S)
      if not st["dead"] and st["beat"] and st["beat"].get("state") == "building"
  ]


def wait_published(store_dir: str, split: str, *, command: str, timeout_s: float = WAIT_TIMEOUT_S,
                   poll_s: float = 5.0, log_every_s: float = 60.0,
                   remote_timeout_s: float = store.REMOTE_TIMEOUT_S,
                   echo: Callable[[str], None] = logging.warning,
                   while_building: bool = False) -> Optional[dict]:
  """Waits for another process's or job's build of the split to publish its manifest,
  saying what it waits for every log_every_s; IncompleteStoreError (one line) after
  timeout_s. while_building: None as soon as no build runs there (they died or gave up)."""
  sdir = store.split_dir(store_dir, split)
  start = time.monotonic()
  next_log = start
  while True:
    manifest = store.bounded(lambda: store.read_manifest(store_dir, split),
                             remote_timeout_s if store.is_remote(sdir) else None,
                             f"Reading the store manifest in {sdir}")
    if manifest is not None and manifest.get("complete"):
      return manifest
    if while_building and not live_builds(sdir):
      return None
    waited = time.monotonic() - start
    if waited >= timeout_s or time.monotonic() >= next_log:
      builds = describe(other_builds(sdir, None, STALE_AFTER_S))
      if waited >= timeout_s:
        raise store.IncompleteStoreError(
            f"No published store in {sdir} after {timeout_s:g}s of waiting (builds there: "
            f"{builds}); check the builder's output, or build it: `{command}`.")
      echo(f"Waiting for the token store {sdir} to be published by another process or job "
           f"({waited:.0f}s of at most {timeout_s:g}s; builds there: {builds}).")
      next_log = time.monotonic() + log_every_s
    time.sleep(min(poll_s, max(0.0, timeout_s - waited)))


class ProgressLine:
  """The driver's progress line of a build: documents, MB of raw files done, MB/s, ETA."""

  def __init__(self, split: str, pdir: str, total_bytes: int, units: int,
               echo: Callable[[str], None], every_s: float = 5.0):
    self._split, self._pdir, self._total, self._units = split, pdir, total_bytes, units
    self._echo, self._every = echo, every_s
    self._start = self._last = time.monotonic()
    self._said = None

  def tick(self) -> None:
    if time.monotonic() - self._last < self._every:
      return
    self._last = time.monotonic()
    if self._said is not None and self._said.endswith("; writing shards"):
      return  # every file read: no more news until the summary
    p = read_progress(self._pdir)
    if not p["docs"]:  # nothing read yet (workers starting)
      return
    line = progress_text(self._split, p, self._total, self._units, self._last - self._start)
    if p["units_done"] >= self._units:
      line += "; writing shards"
    if line != self._said:
      self._echo(line)
      self._said = line


def progress_text(split: str, p: dict, total_bytes: int, units: int, elapsed_s: float) -> str:
  """e.g. "train: 12,000 documents, 3/8 files, 120.0 of 310.2 MB, 40.1 MB/s, ETA 5s"."""
  text = f"{split}: {p['docs']:,} documents, {p['units_done']}/{units} files"
  if total_bytes:
    rate = p["bytes"] / 1e6 / max(elapsed_s, 1e-9)
    text += f", {p['bytes'] / 1e6:.1f} of {total_bytes / 1e6:.1f} MB, {rate:.3g} MB/s"
    if p["bytes"]:
      text += f", ETA {max(0.0, (total_bytes - p['bytes']) / 1e6 / max(rate, 1e-9)):.0f}s"
  return text


def remove_file(path: str) -> None:
  if store.exists(path):
    store.gfile().remove(path) if store.is_remote(path) else os.remove(path)


def retire(split_dir: str, old: Optional[dict]) -> None:
  """After --overwrite published a new build: the old build stays readable for readers that
  opened it for retain_s; the old layout's shards are removed."""
  if not old:
    return
  if old.get("build"):
    write_heartbeat(os.path.join(split_dir, old["build"]), state="retired")
    return
  for d in old.get("per_domain", {}).values():
    for s in d.get("shards", []):
      remove_file(os.path.join(split_dir, s["file"]))
