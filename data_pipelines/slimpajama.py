"""SlimPajama: 7 domains from its `*.jsonl.zst` layout (meta.redpajama_set_name).

Layout: `<dir>/train/chunk*/*.jsonl.zst`, `<dir>/validation/chunk*/...`,
`<dir>/test/...`. Domains: arxiv, book, c4, commoncrawl, github,
stackexchange, wikipedia (the set names without "RedPajama"). Call
`register(data_dir)` or set $DOREMI_JAX_SLIMPAJAMA_DIR before import.
"""

from data_pipelines import core
from data_pipelines import layouts

SET_NAMES = ("RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook",
             "RedPajamaArXiv", "RedPajamaWikipedia", "RedPajamaStackExchange")
SPLITS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


def register(data_dir: str, *, vocabulary=None, name: str = "slimpajama",
             on_malformed: str = "error") -> core.DomainSet:
  """Registers `{name}_<domain>` tasks, `{name}_natural` and `_uniform`."""
  by_value = layouts.domain_sources(data_dir, SPLITS, "meta.redpajama_set_name", SET_NAMES,
                                    on_malformed)
  srcs = {v[len("RedPajama"):]: s for v, s in by_value.items()}
  dset = core.register_domain_set(
      name, srcs, vocabulary=vocabulary, metadata={
          "data_dir": data_dir,
          "domain_field": "meta.redpajama_set_name"
      })
  dset.metadata["set_names"] = {core.sanitize(v[len("RedPajama"):]): v for v in SET_NAMES}
  return dset


layouts.register_from_env("SLIMPAJAMA", register)
