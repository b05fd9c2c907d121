"""The Pile: 22 domains from its `*.jsonl.zst` files (meta.pile_set_name).

Layout: `<dir>/train/*.jsonl.zst`, `<dir>/val.jsonl.zst` (or `validation/`),
`<dir>/test.jsonl.zst`. Domain names are sanitized ("Pile-CC" -> "pile_cc",
task "pile_pile_cc"); the originals are in DomainSet.original_names.

Registered mixtures: pile_natural (= the paper's baseline weights: token
counts x the Pile's epochs), pile_uniform, pile_baseline, pile_doremi_280m,
pile_doremi_1b. The set's metadata["epochs"] holds the Pile's epochs per
domain (pipeline.natural_weights='counted' recomputes the baseline from this
tokenizer's counts, as Appendix C describes). Call `register(data_dir)`, or set $DOREMI_JAX_PILE_DIR before
importing this module. Each domain's source scans all files and keeps its
lines: for the full Pile, pre-split the files per domain and use
data_pipelines.custom.register_directory instead.
"""

from data_pipelines import core
from data_pipelines import layouts
from data_pipelines import weights

PILE_SET_NAMES = ("Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "ArXiv", "Github",
                  "FreeLaw", "StackExchange", "USPTO Backgrounds", "PubMed Abstracts",
                  "Gutenberg (PG-19)", "OpenSubtitles", "Wikipedia (en)", "DM Mathematics",
                  "Ubuntu IRC", "BookCorpus2", "EuroParl", "HackerNews", "YoutubeSubtitles",
                  "PhilPapers", "NIH ExPorter", "Enron Emails")
SPLITS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}
WEIGHT_FILES = ("pile_baseline", "pile_doremi_280m", "pile_doremi_1b")


def register(data_dir: str, *, vocabulary=None, name: str = "pile",
             on_malformed: str = "error") -> core.DomainSet:
  """Registers `{name}_<domain>` tasks and the mixtures listed above."""
  srcs = layouts.domain_sources(data_dir, SPLITS, "meta.pile_set_name", PILE_SET_NAMES,
                                on_malformed)
  baseline = weights.read_weights("pile_baseline")
  epochs = weights.read_metadata(weights.shipped_weights_path("pile_baseline"))["pile_epochs"]
  dset = core.register_domain_set(
      name, srcs, vocabulary=vocabulary, natural_rates=baseline, metadata={
          "data_dir": data_dir,
          "domain_field": "meta.pile_set_name",
          "epochs": epochs
      })
  for wf in WEIGHT_FILES:
    weights.register_mixture_from_weights(wf, f"{dset.name}{wf[len('pile'):]}",
                                          domain_set=dset.name)
  return dset


layouts.register_from_env("PILE", register)
