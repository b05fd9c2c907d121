"""Several builds and readers of one token store at once (doremi_jax/store_builds.py).

Real build processes (the doremi-build-store entry point) started together on one store,
killed with SIGKILL, a reader during a rebuild, bounded waits; the same on ram://, where
builds run in threads of one process since ram:// is that process's memory.
"""
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import build_store
from data_pipelines import custom
from doremi_jax import store
from doremi_jax import store_builds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = 32
DOMAINS = ("web", "code", "books", "math")
NAME = "stoshare"
REG = f"""import glob, os
from data_pipelines import custom
custom.register_jsonl_domains(name={NAME!r}, domain_field="meta.src", domains={list(DOMAINS)!r},
    paths=sorted(glob.glob(os.path.join(os.path.dirname(__file__), "raw", "*.jsonl"))),
    val_fraction=0.2)
"""


def _write_corpus(write, root, n_files=3, per_file=400):
  rng = np.random.default_rng(0)
  paths = []
  for f in range(n_files):
    lines = []
    for i in range(per_file):
      d = DOMAINS[rng.integers(len(DOMAINS))]
      lines.append(
          json.dumps({
              "text": f"{d} {f}.{i} " + "ab c" * int(rng.integers(1, 80)),
              "meta": {
                  "src": d
              }
          }))
    paths.append(os.path.join(root, f"p{f}.jsonl"))
    write(paths[-1], "\n".join(lines) + "\n")
  return paths


def _write(path, text):
  """Local paths and ram:// alike."""
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(text)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Raw files, a module registering them (for the build processes), a reference store."""
  root = tmp_path_factory.mktemp("share")
  os.makedirs(root / "raw")
  paths = _write_corpus(_write, str(root / "raw"))
  (root / "stoshare_reg.py").write_text(REG)
  custom.register_jsonl_domains(name=NAME, paths=paths, domain_field="meta.src",
                                domains=list(DOMAINS), val_fraction=0.2)
  ref = str(root / "ref")
  build_store.build_store(NAME, "train", L, ref, rows_per_shard=50)
  return {"root": root, "ref": ref}


def _published(store_dir, split="train"):
  with tf.io.gfile.GFile(os.path.join(store_dir, split, store.MANIFEST), "rb") as f:
    return json.load(f)


def _digest(store_dir, split="train", shards_only=False):
  """Hashes of the published build's files: equal for builds of the same inputs (the
  shards only: equal for the same corpus registered under another name)."""
  root = os.path.join(store_dir, split, _published(store_dir, split)["build"])
  out = {}
  for d, _, files in tf.io.gfile.walk(root):
    for name in files:
      if shards_only and not name.endswith(".array_record"):
        continue
      with tf.io.gfile.GFile(os.path.join(d, name), "rb") as fh:
        out[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _cli_args(store_dir, *extra):
  return [
      "--module=stoshare_reg", f"--domain_set={NAME}", "--split=train", f"--sequence_length={L}",
      f"--store_dir={store_dir}", "--rows_per_shard=50", *extra
  ]


def _start(corpus, store_dir, *extra):
  env = dict(os.environ, PYTHONPATH=f"{ROOT}:{corpus['root']}")
  code = "import sys; from doremi_jax import cli; sys.exit(cli.build_store())"
  return subprocess.Popen([sys.executable, "-c", code, *_cli_args(store_dir, *extra)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _own_build(split_dir, pid):
  """The name of the build directory that process `pid` is writing, or None."""
  for name in store_builds.list_builds(split_dir):
    beat = store_builds.read_json(
        os.path.join(split_dir, store_builds.BUILDS, name, store_builds.HEARTBEAT))
    if beat and beat["pid"] == pid:
      return name
  return None


def _hold_until_all_building(procs, split_dir, timeout_s=240):
  """Stops each process (SIGSTOP) once its build directory exists and resumes all when
  every one has one: the builds are then truly in flight together."""
  held, deadline = set(), time.monotonic() + timeout_s
  while len(held) < len(procs) and time.monotonic() < deadline:
    for p in procs:
      if p.pid not in held and _own_build(split_dir, p.pid):
        os.kill(p.pid, signal.SIGSTOP)
        held.add(p.pid)
    assert all(p.poll() is None for p in procs), "a build finished before all had started"
    time.sleep(0.02)
  for p in procs:
    os.kill(p.pid, signal.SIGCONT)
  assert len(held) == len(procs), "not every build started within the time"


@pytest.mark.slow  # 35-60 s: each process imports TensorFlow and Beam
@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_builds_all_succeed_with_one_store(corpus, tmp_path, n):
  # Catches: builds that delete each other's files (the old shared _tmp/ and manifest), a
  # second publish that rewrites the first, losers that leave their work behind, and noise.
  store_dir = str(tmp_path / "s")
  procs = [_start(corpus, store_dir) for _ in range(n)]
  _hold_until_all_building(procs, os.path.join(store_dir, "train"))
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0] * n, [o[1][-2000:] for o in outs]
  assert _digest(store_dir) == _digest(corpus["ref"])
  assert store_builds.list_builds(os.path.join(
      store_dir, "train")) == [_published(store_dir)["build"].split("/")[-1]]
  stdout = [o[0] for o in outs]
  assert sum("Built " in s for s in stdout) == 1
  assert sum("Another build published" in s for s in stdout) == n - 1
  for out, err in outs:  # plan, a progress line or two, the outcome, the JSON line
    assert "Building train of stoshare" in out and len(out.splitlines()) <= 6, out
    assert not err.strip(), err


@pytest.mark.slow
def test_builds_killed_at_random_moments(corpus, tmp_path):
  # Catches: a dead build's files damaging a live one, or staying forever.
  seed = int(time.time())
  rng = np.random.default_rng(seed)
  store_dir = str(tmp_path / "s")
  sdir = os.path.join(store_dir, "train")
  early = _start(corpus, store_dir)  # dies during start-up
  time.sleep(float(rng.uniform(0, 3)))
  early.kill()
  survivor = _start(corpus, store_dir)
  victims = [_start(corpus, store_dir) for _ in range(2)]
  _hold_until_all_building([survivor] + victims, sdir)
  for v in victims:  # die while building, each at its own moment
    time.sleep(float(rng.uniform(0, 1.5)))
    v.kill()
  assert [v.wait() for v in [early] + victims] == [-signal.SIGKILL] * 3, seed
  assert len(store_builds.list_builds(sdir)) >= 2  # the victims' files are still there
  out, err = survivor.communicate(timeout=300)
  assert survivor.returncode == 0, (seed, err[-2000:])
  assert _digest(store_dir) == _digest(corpus["ref"]), seed
  # The next build (here a reuse) removes the dead builds' directories, and only those.
  assert build_store.build_store(NAME, "train", L, store_dir, rows_per_shard=50)
  assert store_builds.list_builds(sdir) == [_published(store_dir)["build"].split("/")[-1]], seed


def test_concurrent_builds_in_threads_local(corpus, tmp_path):
  # The default suite's check of the same on a local disk: three builds in threads of one
  # process (the processes' test above is slow). Catches: two publishes, losers' leftovers.
  store_dir = str(tmp_path / "s")
  results = _in_threads(
      3, lambda: build_store.build_store(NAME, "train", L, store_dir, rows_per_shard=50))
  assert {r["build"] for r in results} == {_published(store_dir)["build"]}
  assert _digest(store_dir) == _digest(corpus["ref"])
  assert len(store_builds.list_builds(os.path.join(store_dir, "train"))) == 1


def _in_threads(n, fn):
  results, errors = [], []

  def one():
    try:
      results.append(fn())
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=one) for _ in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert len(results) == n
  return results


@pytest.mark.slow  # about 25 s
def test_reader_keeps_the_published_build_during_a_rebuild(corpus, tmp_path):
  # Catches: a rebuild that changes or removes the files a reader has open or will open.
  store_dir = str(tmp_path / "s")
  build_store.build_store(NAME, "train", L, store_dir, rows_per_shard=50)
  first = _published(store_dir)["build"]
  reader = store.StoreDomains.open(store_dir)
  want = {d: reader.rows(d, np.arange(reader.num_sequences[d]))["targets"] for d in DOMAINS}
  rebuild = _start(corpus, store_dir, "--overwrite")
  late = None
  while rebuild.poll() is None:
    if late is None and _own_build(os.path.join(store_dir, "train"), rebuild.pid):
      late = store.StoreDomains.open(store_dir)  # opened while the rebuild runs
    for d in DOMAINS:
      idx = np.random.default_rng(0).permutation(reader.num_sequences[d])[:20]
      np.testing.assert_array_equal(reader.rows(d, idx)["targets"], want[d][idx])
    time.sleep(0.05)
  assert rebuild.returncode == 0, rebuild.stderr.read()[-2000:]
  assert late is not None and late.manifest["build"] == first
  assert _published(store_dir)["build"] != first  # the rebuild is published ...
  fresh = store.StoreDomains.open(store_dir)
  for d in DOMAINS:  # ... and the old build still reads (retired, removed once stale)
    for st in (reader, late, fresh):
      idx = np.arange(st.num_sequences[d])
      np.testing.assert_array_equal(st.rows(d, idx)["targets"], want[d])
  assert len(store_builds.list_builds(os.path.join(store_dir, "train"))) == 2
  build_store.build_store(NAME, "train", L, store_dir, rows_per_shard=50, retain_s=0)
  assert store_builds.list_builds(os.path.join(
      store_dir, "train")) == [_published(store_dir)["build"].split("/")[-1]]


def test_a_build_taken_for_dead_does_not_publish(corpus, tmp_path):
  # Catches: a build paused past stale_after_s (its files removed by another's clean-up)
  # publishing a pointer to missing shards.
  store_dir = str(tmp_path / "s")
  build_store.build_store(NAME, "train", L, store_dir, rows_per_shard=50)
  m = _published(store_dir)
  bdir = os.path.join(store_dir, "train", m["build"])
  store_builds.write_heartbeat(bdir)
  store_builds.check_own_files(bdir, m)  # whole: no error
  os.remove(os.path.join(bdir, m["per_domain"]["math"]["shards"][-1]["file"]))
  with pytest.raises(store.StoreBuildError, match="were removed while it ran"):
    store_builds.check_own_files(bdir, m)


def test_store_of_the_first_layout_still_reads(corpus, tmp_path):
  # Catches: stores built before builds/<id>/ (shards next to the manifest) left unreadable,
  # or rebuilt for nothing; --overwrite moves them to the new layout.
  store_dir = str(tmp_path / "s")
  sdir = os.path.join(store_dir, "train")
  build_store.build_store(NAME, "train", L, store_dir, rows_per_shard=50)
  m = _published(store_dir)
  for name in os.listdir(os.path.join(sdir, m["build"])):
    os.replace(os.path.join(sdir, m["build"], name), os.path.join(sdir, name))
  os.rmdir(os.path.join(sdir, m["build"]))
  first = {k: v for k, v in m.items() if k not in ("build", "build_args")}
  with open(os.path.join(sdir, store.MANIFEST), "w", encoding="utf-8") as f:
    json.dump(first, f)
  ref = store.StoreDomains.open(corpus["ref"])
  old = store.StoreDomains.open(store_dir)
  for d in DOMAINS:
    idx = np.arange(ref.num_sequences[d])
    np.testing.assert_array_equal(old.rows(d, idx)["targets"], ref.rows(d, idx)["targets"])
  assert "counters" not in build_store.build_store(NAME, "train", L, store_dir,
                                                   rows_per_shard=50)  # reused
  build_store.build_store(NAME, "train", L, store_dir, rows_per_shard=50, overwrite=True)
  assert _digest(store_dir) == _digest(corpus["ref"])
  assert not [n for n in os.listdir(sdir) if n.endswith(".array_record")]


def test_wait_gives_up_with_one_line(corpus, tmp_path, capsys):
  # Catches: a wait that spins silently or forever, or a multi-line error.
  store_dir = str(tmp_path / "s")
  os.makedirs(os.path.join(store_dir, "train", store_builds.BUILDS, "x"))
  start = time.monotonic()
  with pytest.raises(store.IncompleteStoreError) as e:
    build_store.open_store(f"{NAME}_uniform", "train", L, store_dir=store_dir, process_index=1,
                           wait_timeout_s=1.5)
  assert time.monotonic() - start < 10
  msg = str(e.value)
  assert "\n" not in msg and os.path.join(store_dir, "train") in msg
  assert "after 1.5s" in msg and "builds/x" in msg and "build_store --domain_set=stoshare" in msg
  assert "Waiting for the token store" in capsys.readouterr().out


def test_wait_returns_when_another_process_publishes(corpus, tmp_path):
  # Catches: a waiting host that misses the publish (e.g. looks for the old layout's files).
  store_dir = str(tmp_path / "s")
  builder = threading.Timer(
      1.0, lambda: build_store.build_store(NAME, "train", L, store_dir, rows_per_shard=50))
  builder.start()
  st = build_store.open_store(f"{NAME}_uniform", "train", L, store_dir=store_dir, process_index=1,
                              wait_timeout_s=120)
  builder.join()
  assert st.num_sequences == store.StoreDomains.open(corpus["ref"]).num_sequences


def _fake_build(split_dir, name, **beat):
  bdir = store_builds.build_dir(split_dir, name)
  _write(f"{bdir}/x.array_record", "partial")
  beat = dict(
      {
          "host": store_builds.socket.gethostname(),
          "pid": os.getpid(),
          "time": time.time(),
          "state": "building"
      }, **beat)
  _write(f"{bdir}/{store_builds.HEARTBEAT}", json.dumps(beat))
  return bdir


def test_open_store_waits_for_another_jobs_build_then_builds_if_it_died(corpus, tmp_path, capsys):
  # Catches: a second job that builds the same store again while one builds it, or that
  # waits for a build that died.
  store_dir = str(tmp_path / "s")
  sdir = os.path.join(store_dir, "train")
  _fake_build(sdir, "other_job")  # alive: this process's pid, a fresh heartbeat
  other = threading.Timer(
      1.5, lambda: build_store.build_store(NAME, "train", L, store_dir, rows_per_shard=50))
  other.start()
  st = build_store.open_store(f"{NAME}_uniform", "train", L, store_dir=store_dir)
  other.join()
  out = capsys.readouterr().out
  assert "Waiting for the token store" in out and out.count("Building train") == 1
  assert st.manifest["build"] == _published(store_dir)["build"]
  gone = subprocess.Popen(["true"])
  gone.wait()
  store_dir = str(tmp_path / "s2")
  _fake_build(os.path.join(store_dir, "train"), "died", pid=gone.pid)
  st = build_store.open_store(f"{NAME}_uniform", "train", L, store_dir=store_dir)
  out = capsys.readouterr().out
  assert "Waiting for" not in out and "Removed a dead build's files" in out
  assert "Built " in out
  assert st.num_sequences == store.StoreDomains.open(corpus["ref"]).num_sequences


def test_damaged_shard_names_the_command_that_mends_it(corpus, tmp_path, monkeypatch):
  # Catches: an error without the rebuild command, or a command that does not rebuild.
  monkeypatch.syspath_prepend(str(corpus["root"]))
  store_dir = str(tmp_path / "s")
  build_store.main(_cli_args(store_dir))
  m = _published(store_dir)
  shard = os.path.join(store_dir, "train", m["build"], m["per_domain"]["web"]["shards"][0]["file"])
  with open(shard, "r+b") as f:
    f.truncate(100)
  st = store.StoreDomains.open(store_dir)
  with pytest.raises(FileNotFoundError, match="unreadable") as e:
    st.rows("web", np.arange(3))
  cmd = str(e.value).split("`")[1]
  assert f"--store_dir={store_dir}" in cmd and "--overwrite" in cmd
  build_store.main(shlex.split(cmd)[3:])  # the command, as given, mends it
  assert _digest(store_dir) == _digest(corpus["ref"])


def test_unreachable_remote_store_fails_in_bounded_time():
  # Catches: an open of an unreachable gs:// store that hangs or prints a traceback page.
  start = time.monotonic()
  with pytest.raises(store.StoreUnreachableError) as e:
    store.StoreDomains.open("gs://doremi-jax-no-such-bucket-0/s", remote_timeout_s=20)
  assert time.monotonic() - start < 30 and "\n" not in str(e.value)
  assert "gs://doremi-jax-no-such-bucket-0/s/train" in str(e.value)
  with pytest.raises(store.StoreUnreachableError, match="Probe did not answer within 0.3s"):
    store.bounded(lambda: time.sleep(30), 0.3, "Probe")  # a call that hangs is cut off


# ------------------------------------------------------------------- ram://


@pytest.fixture(scope="module")
def ram_corpus(corpus):
  paths = _write_corpus(_write, "ram://share_raw")
  custom.register_jsonl_domains(name="stoshareram", paths=paths, domain_field="meta.src",
                                domains=list(DOMAINS), val_fraction=0.2)
  return corpus


def test_ram_concurrent_builds_publish_one(ram_corpus):
  # Catches on a tf.io.gfile scheme (gs:// stand-in): two publishes of one store, and
  # losers' leftovers.
  store_dir = "ram://share_store_conc"
  results = _in_threads(
      3, lambda: build_store.build_store("stoshareram", "train", L, store_dir, rows_per_shard=50))
  assert {r["build"] for r in results} == {_published(store_dir)["build"]}
  assert _digest(store_dir, shards_only=True) == _digest(ram_corpus["ref"], shards_only=True)
  assert len(store_builds.list_builds(f"{store_dir}/train")) == 1


def test_ram_dead_builds_removed_live_kept(ram_corpus):
  # Catches: removing a live build's files, or keeping a dead one's forever.
  store_dir = "ram://share_store_dead"
  sdir = f"{store_dir}/train"
  gone = subprocess.Popen(["true"])
  gone.wait()
  beats = {
      "dead_pid": {
          "pid": gone.pid,
          "time": time.time()
      },
      "stale": {
          "pid": os.getpid(),
          "time": time.time() - 7200,
          "host": "elsewhere"
      },
      "live": {
          "pid": os.getpid(),
          "time": time.time()
      },
      "live_elsewhere": {
          "pid": 1,
          "time": time.time(),
          "host": "elsewhere"
      },
  }
  for name, beat in beats.items():
    _fake_build(sdir, name, **beat)
  build_store.build_store("stoshareram", "train", L, store_dir, rows_per_shard=50)
  left = set(store_builds.list_builds(sdir))
  assert left == {"live", "live_elsewhere", _published(store_dir)["build"].split("/")[-1]}
  assert _digest(store_dir, shards_only=True) == _digest(ram_corpus["ref"], shards_only=True)


def test_ram_rebuild_and_wait(ram_corpus, caplog):
  # Catches on ram://: a silent or multi-line wait, and --overwrite deleting the build a
  # reader has open.
  store_dir = "ram://share_store_rebuild"
  with pytest.raises(store.IncompleteStoreError, match=r"^No published store in ram://[^\n]*$"):
    store_builds.wait_published(store_dir, "train", command="build it", timeout_s=0.5, poll_s=0.1)
  assert "Waiting for the token store ram://share_store_rebuild/train" in caplog.text
  build_store.build_store("stoshareram", "train", L, store_dir, rows_per_shard=50)
  reader = store.StoreDomains.open(store_dir)
  first = reader.manifest["build"]
  build_store.build_store("stoshareram", "train", L, store_dir, rows_per_shard=50, overwrite=True)
  assert _published(store_dir)["build"] != first
  assert tf.io.gfile.exists(f"{store_dir}/train/{first}/{reader._files['web'][0].split('/')[-1]}")
  fresh = store.StoreDomains.open(store_dir)
  for d in DOMAINS:
    idx = np.arange(fresh.num_sequences[d])
    np.testing.assert_array_equal(reader.rows(d, idx)["targets"], fresh.rows(d, idx)["targets"])
