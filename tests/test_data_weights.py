"""Weights files, validation, natural / uniform / UniMax weights."""
import json
import os

import pytest

import data_pipelines
from data_pipelines import demo  # pylint: disable=unused-import
from data_pipelines import pile
from data_pipelines import sources
from data_pipelines import weights


def test_read_write_roundtrip(tmp_path):
  path = str(tmp_path / "sub" / "w.json")
  weights.write_weights(path, {"a": 0.25, "b": 0.75}, step=10, note="x")
  with open(path) as f:
    raw = json.load(f)
  assert raw == {"domains": {"a": 0.25, "b": 0.75}, "step": 10, "note": "x"}
  assert weights.read_weights(path) == {"a": 0.25, "b": 0.75}
  assert weights.read_metadata(path) == {"step": 10, "note": "x"}


@pytest.mark.parametrize("domains,match", [
    ({
        "a": 1.0,
        "zz": 1.0
    }, "Unknown domain 'zz'"),
    ({
        "a": -0.1,
        "b": 1.0
    }, "Domain 'a'.*>= 0"),
    ({
        "a": 0.0,
        "b": 0.0
    }, "sum to 0"),
])
def test_validation(tmp_path, domains, match):
  path = str(tmp_path / "bad.json")
  with open(path, "w") as f:
    json.dump({"domains": domains}, f)
  with pytest.raises(ValueError, match=match) as e:
    weights.read_weights(path, domains=["a", "b"])
  assert "bad.json" in str(e.value)


def test_missing_and_malformed_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    weights.read_weights(str(tmp_path / "nope.json"))
  path = tmp_path / "flat.json"
  path.write_text('{"a": 1}')
  with pytest.raises(ValueError, match="expected"):
    weights.read_weights(str(path))


def test_shipped_pile_weights():
  for name in pile.WEIGHT_FILES:
    w = weights.read_weights(name)
    assert len(w) == 22
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-3)
    meta = weights.read_metadata(os.path.join(weights.WEIGHTS_DIR, name + ".json"))
    assert meta["pile_set_names"]["pile_cc"] == "Pile-CC"
  assert weights.read_weights("pile_doremi_280m")["pile_cc"] == 0.6057
  assert weights.read_weights("pile_baseline")["wikipedia_en"] == 0.0919


def test_uniform():
  assert weights.uniform_weights(["a", "b", "c", "d"]) == {
      "a": 0.25,
      "b": 0.25,
      "c": 0.25,
      "d": 0.25
  }
  names = data_pipelines.domain_names("demo_uniform")
  assert weights.uniform_weights("demo_uniform") == {d: 1 / 7 for d in names}


def test_unimax_hand_computed():
  # Budget 100 over 3 domains, at most 2 epochs each.
  # small: cap 2*10 = 20 < 100/3 -> 20; left 80 over 2 -> 40 each;
  # mid: cap 2*15 = 30 < 40 -> 30; left 50 -> big gets 50 (cap 2000).
  w = weights.unimax_weights({"big": 1000, "mid": 15, "small": 10}, total_tokens=100, max_epochs=2)
  assert w == pytest.approx({"big": 0.5, "mid": 0.3, "small": 0.2})
  # Nothing capped: uniform.
  assert weights.unimax_weights({
      "a": 100,
      "b": 200
  }, 10, 1) == (
      pytest.approx({
          "a": 0.5,
          "b": 0.5
      }))


def test_natural_weights_with_epochs_and_sampling():
  docs = {"x": ["aaaa", "bb"], "y": ["cccccccc"]}
  data_pipelines.register_domain_set("natset", {
      k: sources.generator_source(lambda s, v=v: iter(v)) for k, v in docs.items()
  })
  # Tokens incl. EOS: x = 5 + 3 = 8, y = 9.
  assert weights.natural_weights("natset") == pytest.approx({"x": 8 / 17, "y": 9 / 17})
  assert weights.natural_weights("natset", epochs={"x": 2.0}) == (
      pytest.approx({
          "x": 16 / 25,
          "y": 9 / 25
      }))
  assert weights.natural_weights("natset", max_examples_per_domain=1) == pytest.approx({
      "x": 5 / 14,
      "y": 9 / 14
  })
  with pytest.raises(ValueError, match="Unknown domain 'zz'"):
    weights.natural_weights("natset", epochs={"zz": 2.0})
