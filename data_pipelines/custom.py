"""User corpora: a directory of per-domain files, a JSONL with a domain field,
TFDS datasets. The register functions are gin-configurable, e.g.

  import data_pipelines.custom
  data_pipelines.custom.register_jsonl_domains.paths = ['/data/all.jsonl']
  data_pipelines.custom.register_jsonl_domains.domain_field = 'meta.source'
"""
from typing import Mapping, Optional, Sequence

import gin

from data_pipelines import core
from data_pipelines import sources


@gin.configurable
def register_directory(name: str = "custom", data_dir: str = gin.REQUIRED, vocabulary=None,
                       text_field: str = "text", val_fraction: float = 0.05,
                       on_malformed: str = "error") -> core.DomainSet:
  """One domain per file stem or subdirectory of `data_dir`."""
  srcs = sources.directory_domains(data_dir, text_field=text_field, val_fraction=val_fraction,
                                   on_malformed=on_malformed)
  return core.register_domain_set(name, srcs, vocabulary=vocabulary,
                                  metadata={"data_dir": data_dir})


@gin.configurable
def register_jsonl_domains(name: str = "custom", paths: Sequence[str] = gin.REQUIRED,
                           domain_field: str = "domain", domains: Optional[Sequence[str]] = None,
                           vocabulary=None, text_field: str = "text", val_fraction: float = 0.05,
                           on_malformed: str = "error") -> core.DomainSet:
  """One domain per value of `domain_field` (a dotted key) in JSONL files."""
  srcs = sources.jsonl_field_domains(paths, domain_field, domains=domains, text_field=text_field,
                                     val_fraction=val_fraction, on_malformed=on_malformed)
  return core.register_domain_set(name, srcs, vocabulary=vocabulary, metadata={
      "paths": list(paths),
      "domain_field": domain_field
  })


@gin.configurable
def register_tfds(name: str = "tfds", datasets: Mapping[str,
                                                        str] = gin.REQUIRED, text_key: str = "text",
                  data_dir: Optional[str] = None, vocabulary=None) -> core.DomainSet:
  """One domain per prepared TFDS dataset: {domain: 'tfds_name:version'}."""
  srcs = {d: sources.tfds_source(n, data_dir=data_dir) for d, n in datasets.items()}
  return core.register_domain_set(name, srcs, vocabulary=vocabulary, text_key=text_key,
                                  metadata={"datasets": dict(datasets)})
