"""The Beam job of a store build: the pipeline, its run into the build's own directory, and
the publish step (data_pipelines/build_store.py drives it; doremi_jax/store_beam.py holds the
workers' code; doremi_jax/store_builds.py how builds share a store)."""
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Optional, Sequence

from doremi_jax import store
from doremi_jax import store_builds

StoreBuildError = store.StoreBuildError


def echo(line: str) -> None:
  print(line, flush=True)


def log_path(split_dir: str, build_id: str) -> str:
  """Where a build's Beam log goes: in the store for local stores, else the temp dir."""
  root = (
      os.path.join(tempfile.gettempdir(), "doremi_jax_store_logs")
      if store.is_remote(split_dir) else os.path.join(split_dir, "logs"))
  os.makedirs(root, exist_ok=True)
  return os.path.join(root, f"{build_id}.log")


_QUIET = {"depth": 0, "saved_fd": None, "file": None, "handlers": None}
_QUIET_LOCK = threading.Lock()


@contextlib.contextmanager
def beam_logs_to(path: Optional[str]):
  """Python logging and native stderr (Beam, its worker processes, TensorFlow) go to `path`
  while the build runs; None: left as they are (--verbose). Nested or concurrent uses in one
  process share the first one's file."""
  if path is None:
    yield
    return
  with _QUIET_LOCK:
    if _QUIET["depth"] == 0:
      sys.stderr.flush()
      f = open(path, "ab")  # pylint: disable=consider-using-with
      root = logging.getLogger()
      handler = logging.StreamHandler(open(path, "a", encoding="utf-8"))  # pylint: disable=consider-using-with
      handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
      _QUIET.update(saved_fd=os.dup(2), file=f, handlers=(root.handlers[:], root.level, handler))
      os.dup2(f.fileno(), 2)
      root.handlers = [handler]
      root.setLevel(logging.INFO)
    _QUIET["depth"] += 1
  try:
    yield
  finally:
    with _QUIET_LOCK:
      _QUIET["depth"] -= 1
      if _QUIET["depth"] == 0:
        sys.stderr.flush()
        os.dup2(_QUIET["saved_fd"], 2)
        os.close(_QUIET["saved_fd"])
        _QUIET["file"].close()
        handlers, level, handler = _QUIET["handlers"]
        root = logging.getLogger()
        root.handlers, _ = handlers, root.setLevel(level)
        handler.close()


def _runner_and_options(pipeline_args: Sequence[str], num_workers: int):
  """FnApiRunner for direct runs (never Prism); the options as given else."""
  from apache_beam.options import pipeline_options as po  # pylint: disable=g-import-not-at-top
  args = list(pipeline_args)
  options = po.PipelineOptions(args)
  runner = options.view_as(po.StandardOptions).runner
  if runner not in (None, "DirectRunner", "direct", "FnApiRunner"):
    return runner, options
  from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=g-import-not-at-top
  direct = options.view_as(po.DirectOptions)
  if not any(a.startswith("--direct_num_workers") for a in args):
    direct.direct_num_workers = int(num_workers)
  if not any(a.startswith("--direct_running_mode") for a in args):
    direct.direct_running_mode = ("in_memory"
                                  if direct.direct_num_workers == 1 else "multi_processing")
  return fn_runner.FnApiRunner(), options


def _pipeline(p, dset, split, length, bdir, meta, rows_per_shard, groups, fallback, job):
  """Adds the build's transforms to pipeline `p` (see doremi_jax.store_beam); every file it
  writes is under the build's own directory `bdir`."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from doremi_jax import store_beam  # pylint: disable=g-import-not-at-top
  tmp_dir, pdir = os.path.join(bdir, "_tmp"), store_builds.progress_dir(bdir)
  stage1 = []
  units = [(gi, fi, path) for gi, g in enumerate(groups) for fi, path in enumerate(g["files"])]
  if units:
    stage1.append(
        p | "RawFiles" >> beam.Create(units)
        | "SpreadFiles" >> beam.Reshuffle()
        | "ReadFile" >> beam.ParDo(store_beam.ReadFile(groups, job["tokenizer"], tmp_dir, pdir)))
  if fallback:
    tasks = [(d, t) for d, t in dset.tasks() if d in fallback]
    stage1.append(
        p | "TaskDomains" >> beam.Create(list(range(len(tasks))))
        | "SpreadTasks" >> beam.Reshuffle()
        | "ReadTask" >> beam.ParDo(store_beam.ReadTask(split, tmp_dir, len(groups), tasks, pdir)))
  plan = (
      stage1 | "Chunks" >> beam.Flatten()
      | "AllChunks" >> beam.combiners.ToList()
      |
      "Plan" >> beam.Map(store_beam.make_plan, domains=dset.domains, domain_ids=meta["domain_ids"],
                         sequence_length=length, rows_per_shard=rows_per_shard, split=split))
  shards = (
      plan | "ShardSpecs" >> beam.FlatMap(store_beam.shard_specs)
      | "SpreadShards" >> beam.Reshuffle()
      | "WriteShard" >> beam.ParDo(store_beam.WriteShard(bdir, length)))
  _ = (
      shards | "AllShards" >> beam.combiners.ToList()
      | "Manifest" >> beam.Map(store_beam.write_manifest, plan=beam.pvalue.AsSingleton(plan),
                               meta=meta, out_dir=bdir, tmp_dir=tmp_dir))


def _beam_error(e: Exception) -> Optional[Exception]:
  """The build's own error inside a runner's wrapped exception, if any."""
  if isinstance(e, (StoreBuildError, FileNotFoundError, PermissionError)):
    return type(e)(str(e).split(" [while running")[0])
  text = str(e)
  for cls in (StoreBuildError, FileNotFoundError, PermissionError):
    name = "StoreBuildError" if cls is StoreBuildError else cls.__name__
    marker = f"{name}: "
    if marker in text:
      msg = text[text.rindex(marker) + len(marker):].split("\n")[0]
      msg = msg.split(" [while running")[0].strip()
      return cls(msg)
  return None


def run(dset, split, length, meta, rows_per_shard, num_workers, pipeline_args, groups, fallback,
        job) -> tuple[dict, dict]:
  """Runs the Beam build into job["bdir"]: (the build's manifest, Beam counters)."""
  files = [path for g in groups for path in g["files"]]
  total = sum(store.file_size(path) for path in files)
  units = len(files) + len(fallback)
  echo(f"Building {split} of {dset.name} (L={length}) into {job['sdir']}: {len(files)} raw "
       f"files ({total / 1e6:.1f} MB), {len(dset.domains)} domains ({len(fallback)} read via "
       f"their task), {num_workers} worker(s); build {os.path.basename(job['bdir'])}; Beam's "
       f"log: {job['log'] or 'stderr (--verbose)'}.")
  progress = store_builds.ProgressLine(split, store_builds.progress_dir(job["bdir"]), total, units,
                                       echo)
  try:
    with store_builds.Heartbeat(job["bdir"], tick=progress.tick), \
        beam_logs_to(job["log"]):
      import apache_beam as beam  # pylint: disable=g-import-not-at-top
      from apache_beam.metrics import metric  # pylint: disable=g-import-not-at-top
      runner, options = _runner_and_options(pipeline_args, num_workers)
      p = beam.Pipeline(runner=runner, options=options)
      _pipeline(p, dset, split, length, job["bdir"], meta, rows_per_shard, groups, fallback, job)
      result = p.run()
      result.wait_until_finish()
  except BaseException as e:  # pylint: disable=broad-except  (Ctrl-C too: remove our files)
    store.remove_tree(job["bdir"])
    if job["log"]:
      echo(f"The build of {job['sdir']} failed; Beam's log: {job['log']}.")
    ours = _beam_error(e) if isinstance(e, Exception) else None
    if ours is not None:
      raise ours from e
    raise
  counters = {}
  try:
    query = result.metrics().query(metric.MetricsFilter().with_namespace("doremi_jax.store"))
    for c in query["counters"]:
      counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (c.committed or 0)
  except Exception:  # pylint: disable=broad-except  (runners without metrics)
    logging.warning("Beam metrics unavailable from this runner.")
  built = store_builds.read_json(os.path.join(job["bdir"], store.MANIFEST))
  if built is None:
    raise StoreBuildError(f"The build in {job['bdir']} finished without a "
                          "manifest; see the runner's logs and rerun it.")
  return built, counters


def publish(manifest: dict, counters: dict, replaced: Optional[dict], job: dict) -> dict:
  """Publishes the build (or keeps the one another build published first)."""
  sdir, bdir = job["sdir"], job["bdir"]
  store.remove_tree(store_builds.progress_dir(bdir))
  store_builds.check_own_files(bdir, manifest)
  published, created = store_builds.publish(sdir, manifest, replace=replaced is not None)
  published = published or {}
  if not created:
    store.remove_tree(bdir)
    echo(f"Another build published {sdir} first ({published.get('build')}); kept it and "
         f"removed this build's files.")
    if published.get("build_key") != manifest["build_key"]:
      raise StoreBuildError(
          f"Another build published {sdir} from other inputs while this one "
          f"ran; rebuild it: `{store.rebuild_command(manifest, job['store_dir'], job['split'])}`.")
    return dict(published, counters=counters)
  if published.get("build") != manifest["build"]:  # gs://: another rename landed too
    store_builds.write_heartbeat(bdir, state="retired")  # removed once stale
    logging.warning("Two builds of %s published at once; %s stands.", sdir, published["build"])
    return dict(published, counters=counters)
  store_builds.remove_file(os.path.join(bdir, store_builds.HEARTBEAT))
  store_builds.retire(sdir, replaced)
  echo(f"Built {sdir}: {manifest['rows']:,} rows, {manifest['tokens']:,} tokens, "
       f"{counters.get('documents', 0):,} documents in {time.monotonic() - job['start']:.1f}s "
       f"(published {manifest['build']}).")
  return dict(manifest, counters=counters)
