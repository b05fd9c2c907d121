r"""Builds the packed token store of a domain set's split with Apache Beam.

  python -m data_pipelines.build_store --domain_set=pile \
      --data_dir=gs://bucket/pile --split=train --sequence_length=1024 \
      --store_dir=gs://bucket/stores/pile_spm_L1024 [--num_workers=8] \
      [Beam options: --runner=DataflowRunner --project=... --region=... \
       --temp_location=gs://... --setup_file=./setup.py]

  # a user corpus, registered from the study's gin file and flags (data_pipelines.corpus):
  python -m data_pipelines.build_store --gin_file=pipelines/custom_280m.gin \
      --gin.PIPELINE_DIR="'gs://bucket/study'" --gin.DATA_FILES="['gs://bucket/c/*.parquet']" \
      --sequence_length=1024 --cache_dir=gs://bucket/stores [Beam options]

The SeqIO tasks stay the one definition of domains, vocabulary and
preprocessing: the build tokenizes with the domain set's vocabulary, appends
EOS as the tasks do, and packs within each domain with
doremi_jax.data.pack_documents, so a small store's rows equal
PackedDomains.build's bit for bit. Format and reader: doremi_jax/store.py.

Reading: domains whose source is made of raw files (data_pipelines.sources:
the Pile and SlimPajama layouts, JSONL or Parquet files with a domain field, a
directory of per-domain files) are grouped by file set; each raw file is read exactly
once, in parallel over files, and every record is routed by its domain field
(local paths, gs:// and other tf.io.gfile schemes). A document's place in
its domain is (file order, line order), as in the sources. Domains without
raw files (the embedded demo corpus, TFDS) fall back to reading their SeqIO
task's dataset once, one domain per worker.

Runner: without --runner (or with --runner=DirectRunner) the build runs on
Beam's Python FnApiRunner, never on the PrismRunner that DirectRunner would
try first (it downloads a binary): in-process for num_workers=1 (small
corpora build in seconds), else `multi_processing` with num_workers
processes (override with --direct_running_mode). Any other --runner
(Dataflow, Flink, Spark) gets the pipeline options as given.

Reruns: a complete store whose build key matches is reused with no work; a
store without manifest (interrupted) is rebuilt from scratch; a complete
store built from other inputs is refused unless overwrite=True.
"""
import argparse
import importlib
import json
import logging
import os
from typing import Optional, Sequence

from data_pipelines import core
from data_pipelines import sources
from data_pipelines import vocab as vocab_lib
from doremi_jax import store

DEFAULT_ROWS_PER_SHARD = 1 << 16

StoreBuildError = store.StoreBuildError

# ----------------------------------------------------------------- sources


def raw_spec(source, split: str) -> Optional[dict]:
  """How a source reads raw files (data_pipelines.sources sets `source.raw_spec`); None
  for sources read through their task (the demo corpus, TFDS)."""
  spec = getattr(source, "raw_spec", None)
  return spec(split) if callable(spec) else None


def read_groups(dset: core.DomainSet, split: str) -> tuple[list[dict], list[str]]:
  """(groups of domains sharing raw files, domains read via their task)."""
  groups, by_key, fallback = [], {}, []
  for d in dset.domains:
    spec = raw_spec(dset.sources[d], split)
    if spec is None:
      fallback.append(d)
      continue
    key = json.dumps([
        spec[k]
        for k in ("kind", "files", "text_field", "domain_field", "on_malformed", "val_fraction")
    ])
    if key not in by_key:
      by_key[key] = len(groups)
      groups.append({k: spec[k] for k in spec if k != "domain_value"} | {
          "domains": [],
          "route": {} if spec["domain_field"] else None,
          "want_validation": split == "validation"
      })
    g = groups[by_key[key]]
    g["domains"].append(d)
    if g["route"] is not None:
      value = spec["domain_value"]  # one value, or several mapped onto one domain
      for v in [value] if isinstance(value, str) else value:
        g["route"].setdefault(v, []).append(d)
  return groups, fallback


def check_files(groups: Sequence[dict]) -> None:
  """Every raw file exists and is readable, before any compute."""
  for g in groups:
    for path in g["files"]:
      if not store.exists(path):
        raise FileNotFoundError(f"Raw file not found: {path}.")
      if not store.is_remote(path) and not os.access(path, os.R_OK):
        raise PermissionError(f"Raw file not readable: {path}; fix its "
                              "permissions.")


def tokenizer_spec(vocabulary) -> dict:
  """What the workers need to tokenize as the tasks do (store_raw.Tokenizer)."""
  import seqio  # pylint: disable=g-import-not-at-top
  eos = int(vocabulary.eos_id)
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return {"kind": "byte", "eos_id": eos}
  return {"kind": "seqio", "vocabulary": vocabulary, "eos_id": eos}


def source_fingerprint(dset: core.DomainSet) -> str:
  """Hash of the domains' source fingerprints (as PackedDomains keys them)."""
  fps = []
  for d, task in dset.tasks():
    fp = getattr(task.source, "fingerprint", None)
    fp = fp() if callable(fp) else fp
    fps.append((d, str(fp) if fp is not None else repr(task.source)))
  return store.build_key(sources=fps)


# ---------------------------------------------------------------- pipeline


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


def _pipeline(p, dset, split, length, out_dir, tmp_dir, meta, rows_per_shard):
  """Adds the build's transforms to pipeline `p` (see doremi_jax.store_beam)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from doremi_jax import store_beam  # pylint: disable=g-import-not-at-top
  groups, fallback = read_groups(dset, split)
  check_files(groups)
  stage1 = []
  units = [(gi, fi, path) for gi, g in enumerate(groups) for fi, path in enumerate(g["files"])]
  if units:
    stage1.append(p | "RawFiles" >> beam.Create(units)
                  | "SpreadFiles" >> beam.Reshuffle()
                  | "ReadFile" >> beam.ParDo(
                      store_beam.ReadFile(groups, tokenizer_spec(dset.vocabulary), tmp_dir)))
  if fallback:
    for d, task in dset.tasks():
      if d in fallback and split not in task.source.splits:
        raise StoreBuildError(f"Domain {d!r} has no {split!r} split (splits: "
                              f"{list(task.source.splits)}).")
    tasks = [(d, t) for d, t in dset.tasks() if d in fallback]
    stage1.append(
        p | "TaskDomains" >> beam.Create(list(range(len(tasks))))
        | "SpreadTasks" >> beam.Reshuffle()
        | "ReadTask" >> beam.ParDo(store_beam.ReadTask(split, tmp_dir, len(groups), tasks)))
  plan = (
      stage1 | "Chunks" >> beam.Flatten()
      | "AllChunks" >> beam.combiners.ToList()
      |
      "Plan" >> beam.Map(store_beam.make_plan, domains=dset.domains, domain_ids=meta["domain_ids"],
                         sequence_length=length, rows_per_shard=rows_per_shard, split=split))
  shards = (
      plan | "ShardSpecs" >> beam.FlatMap(store_beam.shard_specs)
      | "SpreadShards" >> beam.Reshuffle()
      | "WriteShard" >> beam.ParDo(store_beam.WriteShard(out_dir, length)))
  _ = (
      shards | "AllShards" >> beam.combiners.ToList()
      | "Manifest" >> beam.Map(store_beam.write_manifest, plan=beam.pvalue.AsSingleton(plan),
                               meta=meta, out_dir=out_dir, tmp_dir=tmp_dir))


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


def build_meta(dset: core.DomainSet, split: str, sequence_length: int, rows_per_shard: int) -> dict:
  """The manifest fields that identify a build; build_key hashes its content."""
  meta = {
      "format_version": store.FORMAT_VERSION,
      "domain_set": dset.name,
      "split": split,
      "domains": list(dset.domains),
      "domain_ids": {
          d: dset.domain_id(d) for d in dset.domains
      },
      "vocabulary_key": vocab_lib.vocab_key(dset.vocabulary),
      "sequence_length": int(sequence_length),
      "source_fingerprint": source_fingerprint(dset),
      "rows_per_shard": int(rows_per_shard),
      "record_format": store.RECORD_FORMAT,
      "array_record_options": store.ARRAY_RECORD_OPTIONS
  }
  # The content's key: the shard layout (rows_per_shard) does not change rows.
  meta["build_key"] = store.build_key(**{k: v for k, v in meta.items() if k != "rows_per_shard"})
  return meta


def build_store(domain_set: str, split: str, sequence_length: int, store_dir: str, *,
                num_workers: int = 1, pipeline_args: Sequence[str] = (),
                rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, overwrite: bool = False) -> dict:
  """Builds (or reuses) `<store_dir>/<split>/` and returns its manifest.

  Args:
    domain_set: a registered domain set, or one of its tasks or mixtures.
    split: e.g. "train" or "validation".
    sequence_length: L, the packed row length.
    store_dir: local or gs:// (any tf.io.gfile scheme; ram:// needs
      num_workers=1, since it lives in one process).
    num_workers: DirectRunner worker processes (1: in-process).
    pipeline_args: extra Beam pipeline options, e.g. ["--runner=Dataflow..."].
    rows_per_shard: rows per ArrayRecord file.
    overwrite: rebuild over a complete store built from other inputs.

  Returns:
    The manifest, plus "counters" (this run's Beam counters: raw_lines,
    documents, ...) when a build ran.
  """
  dset = core.get_domain_set(domain_set)
  meta = build_meta(dset, split, sequence_length, rows_per_shard)
  out_dir = store.split_dir(store_dir, split)
  old = store.read_manifest(store_dir, split)
  if old is not None and old.get("complete"):
    if old.get("build_key") == meta["build_key"]:
      logging.info("Store %s is complete; reusing it.", out_dir)
      return old
    if not overwrite:
      diff = sorted(
          k for k in meta if old.get(k) != meta[k] and k not in ("build_key", "rows_per_shard"))
      raise StoreBuildError(f"{out_dir} holds a complete store built from other inputs (differs "
                            f"in {diff}). Choose another --store_dir, or pass --overwrite to "
                            "replace it.")
  if store.is_remote(out_dir) and out_dir.startswith("ram://") and (num_workers != 1):
    raise StoreBuildError("A ram:// store lives in one process: use "
                          "num_workers=1.")
  store.makedirs(out_dir)
  manifest_path = os.path.join(out_dir, store.MANIFEST)
  if store.exists(manifest_path):
    store.gfile().remove(manifest_path) if store.is_remote(manifest_path) else os.remove(
        manifest_path)
  tmp_dir = os.path.join(out_dir, "_tmp")
  store.remove_tree(tmp_dir)
  return _run(dset, split, sequence_length, out_dir, tmp_dir, meta, rows_per_shard, num_workers,
              pipeline_args, store_dir)


def _run(dset, split, length, out_dir, tmp_dir, meta, rows_per_shard, num_workers, pipeline_args,
         store_dir) -> dict:
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.metrics import metric  # pylint: disable=g-import-not-at-top
  runner, options = _runner_and_options(pipeline_args, num_workers)
  p = beam.Pipeline(runner=runner, options=options)
  _pipeline(p, dset, split, length, out_dir, tmp_dir, meta, rows_per_shard)
  try:
    result = p.run()
    result.wait_until_finish()
  except Exception as e:  # pylint: disable=broad-except
    ours = _beam_error(e)
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
  manifest = store.read_manifest(store_dir, split)
  if manifest is None:
    raise StoreBuildError(f"The build of {out_dir} finished without a "
                          "manifest; see the runner's logs and rerun it.")
  logging.info("Built %s: %d rows, %d tokens, counters %s", out_dir, manifest["rows"],
               manifest["tokens"], counters)
  return dict(manifest, counters=counters)


def default_store_root() -> str:
  """$DOREMI_JAX_DATA_DIR/store, or ~/.cache/doremi_jax/store."""
  root = os.environ.get("DOREMI_JAX_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "doremi_jax")
  return os.path.join(root, "store")


def store_path(domain_set: str, sequence_length: int, root: Optional[str] = None) -> str:
  """`<root>/<set>_L<L>_<key>`: one store per (domain set, vocabulary, sources, L), shared
  by every stage and every host; the key changes with the vocabulary or the sources."""
  dset = core.get_domain_set(domain_set)
  key = store.build_key(
      vocabulary_key=vocab_lib.vocab_key(dset.vocabulary),
      source_fingerprint=source_fingerprint(dset))
  return os.path.join(root or default_store_root(), f"{dset.name}_L{sequence_length}_{key}")


def open_store(mixture_or_task_name: str, split: str, sequence_length: int, *,
               store_dir: Optional[str] = None, cache_dir: Optional[str] = None, build: bool = True,
               process_index: int = 0, num_workers: int = 1, pipeline_args: Sequence[str] = (),
               wait_timeout_s: Optional[float] = None) -> store.StoreDomains:
  """The split's token store of the mixture's domain set, opened and checked.

  store_dir: the store (default: store_path(set, L, cache_dir)).
  build: process 0 builds (or reuses) the store with the DirectRunner and the other
    processes wait for its manifest; False: it must exist (built beforehand, e.g. by
    `python -m data_pipelines.build_store` on Dataflow).
  mixture_rates are the mixture's, lazily counted natural rates resolved from the store's
  train token counts.
  """
  dset = core.get_domain_set(mixture_or_task_name)
  store_dir = store_dir or store_path(dset.name, sequence_length, cache_dir)
  meta = build_meta(dset, split, sequence_length, DEFAULT_ROWS_PER_SHARD)
  if build and process_index == 0:
    build_store(dset.name, split, sequence_length, store_dir, num_workers=num_workers,
                pipeline_args=pipeline_args)
  elif build:
    store.wait_for_manifest(store_dir, split, timeout_s=wait_timeout_s, poll_s=1.0)
  st = store.StoreDomains.open(store_dir, split=split, domain_set=dset.name,
                               vocabulary_key=meta["vocabulary_key"],
                               sequence_length=sequence_length)
  cmd = store.build_command(dset.name, split, sequence_length, store_dir)
  for key in ("source_fingerprint", "domains"):
    if st.manifest.get(key) != meta[key]:
      raise store.StoreMismatchError(
          f"Store {store.split_dir(store_dir, split)} was built with {key}="
          f"{st.manifest.get(key)!r}, the domain set now has {meta[key]!r} "
          f"(its sources changed). Rebuild into a new directory: `{cmd}`.")
  counts = st.num_tokens if split == "train" else None
  st.mixture_rates = core.mixture_rates(mixture_or_task_name, natural_counts=counts)
  return st


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--domain_set", default=None, help="a registered domain set, task or mixture")
  p.add_argument(
      "--gin_file", action="append", default=[], help="a user corpus: gin files binding "
      "register_corpus (e.g. pipelines/custom_280m.gin) and --gin.NAME=VALUE bindings, as "
      "given to the pipeline; the domain set is the corpus's")
  p.add_argument("--split", default="train,validation", help="comma-separated splits")
  p.add_argument("--sequence_length", type=int, required=True)
  p.add_argument("--store_dir", default=None,
                 help="the store (default: the one training reads, under --cache_dir)")
  p.add_argument(
      "--cache_dir", default=None,
      help="stores' root, as train.cache_dir (default: $DOREMI_JAX_DATA_DIR/store "
      "or ~/.cache/doremi_jax/store)")
  p.add_argument("--num_workers", type=int, default=1)
  p.add_argument("--rows_per_shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
  p.add_argument("--overwrite", action="store_true")
  p.add_argument(
      "--module", default=None, help="modules registering the set, comma-separated "
      "(default: data_pipelines.<domain_set>)")
  p.add_argument("--data_dir", default=None,
                 help="calls <module>.register(data_dir) (Pile, SlimPajama)")
  p.add_argument("--spm", default=None, help="SentencePiece model for "
                 "register(data_dir, vocabulary=...)")
  args, rest = p.parse_known_args(argv)
  beam_args = [a for a in rest if not a.startswith("--gin.")]
  logging.basicConfig(level=logging.INFO)
  if args.gin_file:
    from data_pipelines import corpus  # pylint: disable=g-import-not-at-top
    args.domain_set = corpus.register_from_gin(
        args.gin_file, [a[len("--gin."):] for a in rest if a not in beam_args])
  elif not args.domain_set:
    p.error("give --domain_set, or --gin_file for a corpus registered from gin")
  modules = [] if args.gin_file else (args.module or f"data_pipelines.{args.domain_set}").split(",")
  for name in modules:
    mod = importlib.import_module(name)
    if args.data_dir and hasattr(mod, "register"):
      mod.register(args.data_dir, vocabulary=vocab_lib.get_vocabulary(args.spm))
  store_dir = args.store_dir or store_path(args.domain_set, args.sequence_length, args.cache_dir)
  for split in args.split.split(","):
    manifest = build_store(args.domain_set, split, args.sequence_length, store_dir,
                           num_workers=args.num_workers, pipeline_args=beam_args,
                           rows_per_shard=args.rows_per_shard, overwrite=args.overwrite)
    print(
        json.dumps({
            "store_dir": store_dir,
            **{
                k: manifest[k] for k in ("domain_set", "split", "rows", "tokens", "raw_lines")
            }
        }))


if __name__ == "__main__":
  main()
