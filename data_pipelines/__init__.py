"""SeqIO domain tasks and mixtures for DoReMi (import-light: no data read).

  import data_pipelines.demo        # demo_<domain>, demo_natural, demo_uniform
  import data_pipelines.pile        # with $DOREMI_JAX_PILE_DIR, or pile.register
  from data_pipelines import register_mixture_from_weights
  register_mixture_from_weights("domain_weights.json", domain_set="demo")
"""
from data_pipelines.core import domain_names
from data_pipelines.core import domain_tasks
from data_pipelines.core import DomainSet
from data_pipelines.core import get_domain_set
from data_pipelines.core import mixture_rates
from data_pipelines.core import register_domain_set
from data_pipelines.core import register_mixture
from data_pipelines.core import sanitize
from data_pipelines.core import task_for_domain
from data_pipelines.weights import natural_weights
from data_pipelines.weights import read_weights
from data_pipelines.weights import register_mixture_from_weights
from data_pipelines.weights import uniform_weights
from data_pipelines.weights import unimax_weights
from data_pipelines.weights import write_weights
