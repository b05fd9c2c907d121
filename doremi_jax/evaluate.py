r"""Per-domain held-out log-perplexity (nats per token), and downstream exact match.

  doremi-evaluate --gin_file=gin/runs/eval.gin --gin.MODEL_DIR="'/tmp/run'"

writes MODEL_DIR/eval.json from the run's latest checkpoint: per-domain log-perplexity,
their uniform average, the worst case, and the checkpoint step. During training,
`train.eval_every` appends the same record to MODEL_DIR/eval_history.jsonl.

  doremi-evaluate --gin_file=gin/runs/downstream.gin --gin.MODEL_DIR="'/tmp/run'"

writes MODEL_DIR/downstream.json: one-shot exact match on the paper's five generative tasks
(downstream_eval.py; `train.downstream` does the same during training, into
downstream_history.jsonl).
"""

if __name__ == "__main__":
  # Under `python -m`, this file runs as __main__; run the importable module instead so
  # that gin registers its configurables once, under doremi_jax.evaluate.
  from doremi_jax import quiet as _quiet  # pylint: disable=g-import-not-at-top
  _quiet.quiet_start()
  from doremi_jax import evaluate as _module  # pylint: disable=g-import-not-at-top
  _module.main()
  raise SystemExit(0)

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import os
from typing import Mapping, Optional

import gin
import jax

from doremi_jax import checkpoint as ckpt_lib
from doremi_jax import config as config_lib
from doremi_jax import data as data_lib
from doremi_jax import downstream_eval
from doremi_jax import evaluation
from doremi_jax import outputs
from doremi_jax import run as run_lib
from doremi_jax.model import config_from_info


@gin.configurable
def evaluate(model_dir: str = gin.REQUIRED, *, batch_size: int = 16,
             mesh_shape=run_lib.DEFAULT_MESH_SHAPE, mixture_or_task_name: Optional[str] = None,
             task_feature_lengths: Optional[Mapping[str, int]] = None,
             cache_dir: Optional[str] = None, step: Optional[int] = None, perplexity: bool = True,
             downstream: Optional[downstream_eval.DownstreamConfig] = None) -> dict:
  """Evaluates MODEL_DIR's latest (or given) checkpoint; writes MODEL_DIR/eval.json.

  The model, mixture and length default to those the run was trained with. With
  `downstream`, also writes MODEL_DIR/downstream.json (and returns it under "downstream");
  perplexity=False skips the per-domain evaluation.
  """
  info = outputs.read_run_info(model_dir)
  if info is None:
    raise FileNotFoundError(f"no run in {model_dir} ({outputs.RUN_INFO} missing); train first.")
  mixture = mixture_or_task_name or info["mixture"]
  seq_len = (
      run_lib.sequence_length(task_feature_lengths)
      if task_feature_lengths else info["sequence_length"])
  domains = data_lib.domain_names(mixture)
  if domains != info["domains"]:
    raise ValueError(f"mixture {mixture!r} has domains {domains}, the run {info['domains']}.")
  cfg = run_lib.RunConfig(model_dir=model_dir, mixture_or_task_name=mixture, seq_len=seq_len,
                          train_steps=1, batch_size=batch_size, mesh_shape=mesh_shape,
                          model=config_from_info(info["model"]))
  if not perplexity and downstream is None:
    raise ValueError("evaluate.perplexity=False and no evaluate.downstream: nothing to "
                     "evaluate; bind evaluate.downstream = @DownstreamConfig() "
                     "(runs/downstream.gin).")
  trainer = run_lib.build_run(cfg, abstract=True).trainer
  ds_eval = None
  if downstream is not None:  # a missing dataset fails before the checkpoint is read
    ds_eval = downstream_eval.DownstreamEvaluator(downstream, model_cfg=trainer.model_cfg,
                                                  mesh=trainer.mesh,
                                                  vocabulary=run_lib.vocabulary(mixture))
  params, ckpt_step = ckpt_lib.restore_params(model_dir, trainer.abstract_state.params, step)
  result = {"step": ckpt_step, "mixture": mixture}
  if perplexity:
    result.update(_perplexity(dataclasses.replace(cfg, cache_dir=cache_dir), trainer, params))
    outputs.write_json(os.path.join(model_dir, outputs.EVAL), result)
  if ds_eval is not None:
    result["downstream"] = {
        "step": ckpt_step,
        "suite": downstream.suite,
        **ds_eval.evaluate(params, ckpt_step)
    }
    outputs.write_json(os.path.join(model_dir, outputs.DOWNSTREAM), result["downstream"])
  return result


def _perplexity(cfg: run_lib.RunConfig, trainer, params) -> dict:
  validation = run_lib.open_domains(cfg, "validation", process_index=jax.process_index())
  try:
    return evaluation.Evaluator(trainer, validation, batch_size=cfg.batch_size).evaluate(params)
  finally:
    validation.close()


def main(argv=None):
  config_lib.run_main(evaluate, argv)
