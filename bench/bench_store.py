r"""Store build and store-fed input, on a synthetic Pile-layout corpus.

  python bench/bench_store.py [--gb=2] [--num_workers=N] [--seq_len=1024]
      [--steps=10000] [--workdir=/tmp/...]
  python bench/bench_store.py --concurrent=3 --gb=0.04 --num_workers=1

Generates `<workdir>/pile_<gb>/train/NN.jsonl.zst` (22 domains in the Pile's
baseline proportions, `meta.pile_set_name`, random ASCII words; never kept
unless --keep), builds its store with `python -m data_pipelines.build_store`
(byte vocabulary: one token per raw byte) and prints raw MB/s per core and
the build's peak memory summed over the whole process tree (the driver and
every Beam worker; RSS, and PSS which counts shared pages once). Then the
same at double the size (--concurrent=N instead: one build alone, then N builds of one store
started together; their wall time side by side, and whether the published shards equal the
lone build's). Then a fresh process (no TensorFlow) reads training
input over the first store with BatchIterator as host 0 of 4 and prints
tokens/s and RSS over the steps.

Per-host demand of the 280M proxy step on v5e-16 (4 hosts x 4 chips): a
DoReMi step costs about 8 N FLOPs per token (6 N proxy forward+backward, 2 N
reference forward; attention ignored, which only lowers the demand), so at
the v5e peak of 197 TFLOP/s bf16 per chip and 100% MFU a host consumes at
most 4 * 197e12 / (8 * 280e6) = 352k tokens/s.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEMAND_TOKENS_PER_S = 4 * 197e12 / (8 * 280e6)

# ----------------------------------------------------------------- corpus


def _pile_names_and_weights():
  with open(os.path.join(ROOT, "data_pipelines", "weights", "pile_baseline.json")) as f:
    weights = json.load(f)["domains"]
  from data_pipelines import pile  # pylint: disable=g-import-not-at-top
  from data_pipelines import core  # pylint: disable=g-import-not-at-top
  names = list(pile.PILE_SET_NAMES)
  p = np.array([weights[core.sanitize(n)] for n in names])
  return names, p / p.sum()


def make_corpus(out_dir: str, gb: float, num_files: int, seed: int = 0) -> int:
  """Writes the synthetic Pile layout; returns its raw (uncompressed) bytes."""
  import zstandard  # pylint: disable=g-import-not-at-top
  names, p = _pile_names_and_weights()
  rng = np.random.default_rng(seed)
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
  words = ["".join(map(chr, rng.choice(letters, rng.integers(2, 10)))) for _ in range(4096)]
  buf = " ".join(rng.choice(words, 4_000_000))
  target = int(gb * 1e9)
  per_file, total = target // num_files, 0
  os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)
  for fi in range(num_files):
    path = os.path.join(out_dir, "train", f"{fi:02d}.jsonl.zst")
    cctx = zstandard.ZstdCompressor(level=1, threads=-1)
    with open(path, "wb") as raw, cctx.stream_writer(raw) as w:
      written = 0
      while written < per_file:
        n = 256
        doms = rng.choice(len(names), n, p=p)
        lens = np.clip(rng.lognormal(7.5, 1.0, n), 50, 40000).astype(int)
        starts = rng.integers(0, len(buf) - 40000, n)
        lines = "".join('{"text": "%s", "meta": {"pile_set_name": "%s"}}\n' %
                        (buf[s:s + k], names[d]) for d, k, s in zip(doms, lens, starts))
        data = lines.encode()
        w.write(data)
        written += len(data)
    total += written
  return total


# ----------------------------------------------------------------- memory


def _tree(root_pid: int) -> list[int]:
  parents = {}
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
      except OSError:
        continue
  out, todo = [], [root_pid]
  while todo:
    pid = todo.pop()
    out.append(pid)
    todo += [c for c, pp in parents.items() if pp == pid]
  return out


def _mem_kb(pid: int) -> tuple[int, int]:
  """(RSS, PSS) in kB of one process, 0 if it is gone."""
  try:
    with open(f"/proc/{pid}/smaps_rollup") as f:
      vals = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.split(":")[0] in ("Rss", "Pss")}
    return vals.get("Rss", 0), vals.get("Pss", 0)
  except (OSError, ValueError, IndexError):
    return 0, 0


def _hwm_mb() -> float:
  """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1e3
  return 0.0


class TreeMemory:
  """Samples the summed RSS and PSS of a process tree in a thread."""

  def __init__(self, pid: int, interval: float = 0.2):
    self.pid, self.interval = pid, interval
    self.peak_rss = self.peak_pss = 0
    self.at_peak: list[int] = []  # RSS (kB) of each process at the peak
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      mems = [_mem_kb(p) for p in _tree(self.pid)]
      if sum(m[0] for m in mems) > self.peak_rss:
        self.peak_rss, self.at_peak = sum(m[0] for m in mems), [m[0] for m in mems if m[0]]
      self.peak_pss = max(self.peak_pss, sum(m[1] for m in mems))
      self._stop.wait(self.interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


# ------------------------------------------------------------------ build


def _build_cmd(data_dir: str, store_dir: str, seq_len: int, num_workers: int) -> list:
  return [
      sys.executable, "-m", "data_pipelines.build_store", "--domain_set=pile",
      "--module=data_pipelines.pile", f"--data_dir={data_dir}", "--split=train",
      f"--sequence_length={seq_len}", f"--store_dir={store_dir}", f"--num_workers={num_workers}"
  ]


_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")


def bench_build(data_dir: str, store_dir: str, raw_bytes: int, seq_len: int,
                num_workers: int) -> dict:
  """Runs the build CLI in a subprocess; its wall time and tree memory."""
  cmd, env = _build_cmd(data_dir, store_dir, seq_len, num_workers), _ENV
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  with TreeMemory(proc.pid) as mem:
    out, err = proc.communicate()
  wall = time.perf_counter() - t
  if proc.returncode:
    raise RuntimeError(f"build failed:\n{err[-3000:]}")
  summary = json.loads(out.strip().splitlines()[-1])
  mb = raw_bytes / 1e6
  return {
      "raw_MB": mb,
      "wall_s": wall,
      "MB_per_s_per_core": mb / wall / num_workers,
      "peak_rss_GB": mem.peak_rss / 1e6,
      "peak_pss_GB": mem.peak_pss / 1e6,
      "driver_rss_GB_at_peak": mem.at_peak[0] / 1e6,
      "worker_rss_GB_at_peak": sum(mem.at_peak[1:]) / 1e6,
      "processes": len(mem.at_peak),
      "rows": summary["rows"],
      "tokens": summary["tokens"]
  }


def _shards(store_dir: str) -> dict:
  """{file: sha256} of the published build's shards."""
  import hashlib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(store_dir, "train", "manifest.json")) as f:
    root = os.path.join(store_dir, "train", json.load(f).get("build", ""))
  return {
      n: hashlib.sha256(open(os.path.join(root, n), "rb").read()).hexdigest()
      for n in os.listdir(root)
      if n.endswith(".array_record")
  }


def bench_concurrent(data_dir: str, work: str, n: int, seq_len: int, num_workers: int) -> None:
  """One build alone, then n builds of one store started together."""
  walls = []
  for k, store_dir in ((1, os.path.join(work, "alone")), (n, os.path.join(work, "shared"))):
    t = time.perf_counter()
    procs = [
        subprocess.Popen(
            _build_cmd(data_dir, store_dir, seq_len, num_workers), cwd=ROOT, env=_ENV,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(k)
    ]
    outs = [p.communicate() for p in procs]
    walls.append(time.perf_counter() - t)
    codes = [p.returncode for p in procs]
    lines = [len(o[0].splitlines()) + len(o[1].splitlines()) for o in outs]
    print(
        f"{k} build(s) of one store: exit codes {codes}, wall {walls[-1]:.1f}s, output lines "
        f"per build {lines}", flush=True)
    if any(codes):
      print("\n".join(o[1][-2000:] for o in outs))
  same = _shards(os.path.join(work, "alone")) == _shards(os.path.join(work, "shared"))
  print(f"{n} concurrent builds: published shards equal the lone build's: {same}; wall "
        f"{walls[1]:.1f}s vs {walls[0]:.1f}s alone (ratio {walls[1] / walls[0]:.2f})")


# ------------------------------------------------------------------ input


def bench_input(store_dir: str, steps: int, global_batch: int, hosts: int, seed: int = 0) -> dict:
  """BatchIterator over the store as host 0 of `hosts` (in a fresh process)."""
  from doremi_jax import data  # pylint: disable=g-import-not-at-top
  from doremi_jax import store  # pylint: disable=g-import-not-at-top
  st = store.StoreDomains.open(store_dir)
  it = data.BatchIterator(st, global_batch_size=global_batch, seed=seed, sampling="stratified",
                          process_index=0, process_count=hosts)
  rss = []
  t = time.perf_counter()
  tokens = 0
  for step in range(steps):
    b = next(it)
    tokens += b["targets"].size
    if step % max(1, steps // 20) == 0:
      rss.append(_mem_kb(os.getpid())[0] / 1e3)
  dt = time.perf_counter() - t
  rss.append(_mem_kb(os.getpid())[0] / 1e3)
  return {
      "tokens_per_s": tokens / dt,
      "steps": steps,
      "host_rows": len(b["targets"]),
      "rss_MB_first": rss[0],
      "rss_MB_last": rss[-1],
      "peak_rss_MB": _hwm_mb(),
      "store_rows": sum(st.num_sequences.values())
  }


def _print(title: str, d: dict) -> None:
  print(
      title + ": " +
      ", ".join(f"{k}={v:,.3f}" if isinstance(v, float) else f"{k}={v:,}" for k, v in d.items()),
      flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gb", type=float, default=2.0)
  p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
  p.add_argument("--num_files", type=int, default=0,
                 help="raw files per corpus (default: 4 per worker, >= 8)")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--steps", type=int, default=10000)
  p.add_argument("--global_batch", type=int, default=512)
  p.add_argument("--hosts", type=int, default=4)
  p.add_argument("--workdir", default=None)
  p.add_argument("--keep", action="store_true")
  p.add_argument("--concurrent", type=int, default=0,
                 help="N: time N builds of one store started together against one alone")
  p.add_argument("--input_only", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.input_only:
    print(json.dumps(bench_input(args.input_only, args.steps, args.global_batch, args.hosts)))
    return
  work = args.workdir or tempfile.mkdtemp(prefix="bench_store_")
  files = args.num_files or max(8, 4 * args.num_workers)
  results = []
  try:
    if args.concurrent:
      raw = make_corpus(os.path.join(work, "raw"), args.gb, files)
      print(f"corpus: {raw / 1e6:,.0f} MB raw in {files} files", flush=True)
      bench_concurrent(
          os.path.join(work, "raw"), work, args.concurrent, args.seq_len, args.num_workers)
      return
    for gb in (args.gb, 2 * args.gb):
      raw_dir = os.path.join(work, f"pile_{gb:g}gb")
      t = time.perf_counter()
      raw = make_corpus(raw_dir, gb, files)
      print(
          f"corpus {gb:g} GB: {raw / 1e6:,.0f} MB raw in {files} files, "
          f"generated in {time.perf_counter() - t:.1f}s", flush=True)
      r = bench_build(raw_dir, os.path.join(work, f"store_{gb:g}gb"), raw, args.seq_len,
                      args.num_workers)
      _print(f"build {gb:g} GB with {args.num_workers} workers", r)
      results.append(r)
      if not args.keep:
        shutil.rmtree(raw_dir)
    ratio = {k: results[1][k] / results[0][k] for k in ("peak_rss_GB", "peak_pss_GB")}
    print(f"build peak RSS ratio (2x corpus / 1x): {ratio['peak_rss_GB']:.3f}"
          f", PSS ratio {ratio['peak_pss_GB']:.3f}")
    out = subprocess.run([
        sys.executable,
        os.path.abspath(__file__), f"--input_only={os.path.join(work, f'store_{args.gb:g}gb')}",
        f"--steps={args.steps}", f"--global_batch={args.global_batch}", f"--hosts={args.hosts}"
    ], check=True, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    _print(
        f"input over the store (host 0 of {args.hosts}, global batch "
        f"{args.global_batch} x {args.seq_len})", r)
    print(f"input / per-host demand of the 280M proxy on v5e-16 "
          f"({DEMAND_TOKENS_PER_S:,.0f} tokens/s): "
          f"{r['tokens_per_s'] / DEMAND_TOKENS_PER_S:.2f}x")
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
