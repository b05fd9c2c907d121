r"""The whole DoReMi study from one gin file.

  doremi-pipeline --gin_file=pipelines/demo_cpu.gin

reference -> DoReMi proxy (iterated rounds) -> main models on the DoReMi weights and on
each baseline (natural token proportions, uniform, UniMax) at equal compute -> per-domain
evaluation -> PIPELINE_DIR/report.md, summary.json and plots.

Every stage is `train.train` inside a gin scope: `reference/`, `proxy/` and `main/`
bindings (model size, steps, batch) override the unscoped ones for that stage. A stage
whose MODEL_DIR already holds a finished run is skipped; an unfinished one resumes, so
rerunning the same command after a preemption continues the study.
"""

if __name__ == "__main__":
  # Under `python -m`, this file runs as __main__; run the importable module instead so
  # that gin registers its configurables once, under doremi_jax.pipeline.
  from doremi_jax import quiet as _quiet  # pylint: disable=g-import-not-at-top
  _quiet.quiet_start()
  from doremi_jax import pipeline as _module  # pylint: disable=g-import-not-at-top
  _module.main()
  raise SystemExit(0)

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
import dataclasses
import functools
import logging
import math
import os
import tempfile
import time
from typing import Optional, Sequence

import gin
import jax

from doremi_jax import aggregate
from doremi_jax import config as config_lib
from doremi_jax import data as data_lib
from doremi_jax import downstream_eval
from doremi_jax import metrics as metrics_lib
from doremi_jax import outputs
from doremi_jax import evaluation
from doremi_jax import mixing_log
from doremi_jax import report as report_lib
from doremi_jax import schedule as schedule_lib
from doremi_jax import train as train_lib
from doremi_jax.model import config_from_info

BASELINES = ("natural", "uniform", "unimax")
# Mixture methods beside offline DoReMi, each one main run at the baselines' compute.
METHODS = ("doremi", "online_doremi", "online_doremi_reweight", "odm", "schedule")


def _scoped_train(scope: str, model_dir: str, mixture: str, **overrides) -> dict:
  """Runs (or resumes, or skips if finished) one stage in its gin scope."""
  study = metrics_lib.current_study()
  label = f"{scope} {os.path.basename(os.path.normpath(model_dir))}"
  with gin.config_scope(scope), (study.stage(scope, label) if study else contextlib.nullcontext()):
    t0 = time.time()
    result = train_lib.train(model_dir, mixture_or_task_name=mixture, **overrides)
    if result["preempted"]:
      logging.warning(
          "[%s] preempted at step %d: rerun the same command to continue the "
          "study from there.", scope, result["step"])
      raise SystemExit(0)
    logging.info("[%s] %s finished at step %s in %.0fs", scope, model_dir, result["step"],
                 time.time() - t0)
    return result


def _write_report(study: dict, pipeline_dir: str) -> dict:
  """report.md, summary.json and plots/ in pipeline_dir (local or gs://)."""
  if "://" not in pipeline_dir:
    return report_lib.write_report(study, pipeline_dir)
  gfile = outputs.gfile()
  with tempfile.TemporaryDirectory() as tmp:
    summary = report_lib.write_report(study, tmp)
    for root, _, files in os.walk(tmp):
      dest = os.path.join(pipeline_dir, os.path.relpath(root, tmp))
      gfile.makedirs(dest)
      for name in files:
        gfile.copy(os.path.join(root, name), os.path.join(dest, name), overwrite=True)
  return summary


def _register(weights: dict, name: str, domain_set: str) -> str:
  from data_pipelines import weights as weights_lib
  weights_lib.register_mixture_from_weights(weights, name, domain_set=domain_set)
  return name


def _trajectory(model_dir: str) -> dict:
  rows = metrics_lib.read_trajectory(model_dir)
  return {
      "steps": [r["step"] for r in rows],
      "domain_weights": [r["domain_weights"] for r in rows],
      "avg_domain_weights": [r["avg_domain_weights"] for r in rows]
  }


def _baseline_weights(name: str, natural: dict, token_counts: dict, *, main_tokens: int,
                      unimax_max_epochs: float) -> dict:
  from data_pipelines import weights as weights_lib
  if name == "natural":
    return natural
  if name == "uniform":
    return weights_lib.uniform_weights(list(natural))
  if name == "unimax":
    return weights_lib.unimax_weights(token_counts, main_tokens, unimax_max_epochs)
  raise ValueError(f"unknown baseline {name!r}: use some of {BASELINES}.")


@gin.configurable
def pipeline(pipeline_dir: str = gin.REQUIRED, *, domain_set: str = gin.REQUIRED,
             reference_weights: str = "natural", max_rounds: int = 1, convergence_tol: float = 1e-3,
             baselines: Sequence[str] = BASELINES, unimax_max_epochs: float = 1.0,
             name: Optional[str] = None, main_steps: int = gin.REQUIRED,
             main_batch_size: int = gin.REQUIRED, sequence_length: int = gin.REQUIRED,
             cache_dir: Optional[str] = None, natural_weights: str = "registered",
             seeds: Optional[Sequence[int]] = None, etas: Optional[Sequence[float]] = None,
             methods: Sequence[str] = ("doremi",), schedule_switch: float = 0.5) -> dict:
  """Runs the study; returns the report's summary.

  reference_weights: "natural" or "uniform" (round 1's reference mixture), or a weights file.
  max_rounds: iterated DoReMi; round r+1's reference trains on round r's output, stopping
    early when max_i |avg_i - ref_i| < convergence_tol.
  main_steps / main_batch_size / sequence_length: the main runs' shared (equal) compute.
  cache_dir: the token stores' root (default: train's default), shared by every stage.
  natural_weights: what "natural" means (reference and baseline). "registered": the set's
    `{set}_natural` mixture (this tokenizer's token proportions, or published weights such
    as the Pile's baseline, which come from the paper's tokenizer). "counted": this
    tokenizer's counts of packed L-token rows times the set's epochs (DomainSet metadata
    "epochs", e.g. the Pile's), normalized: how Appendix C computes the baseline.
  seeds: run every stage (reference, proxy, each main run) once per seed, in
    PIPELINE_DIR/seed<s>/; the report gives mean and standard deviation of DoReMi minus each
    baseline. None: one run with RANDOM_SEED, in PIPELINE_DIR itself.
  etas: DoReMi step sizes, each with its own proxy and main run against the same reference
    and baselines (one DoReMi round only). None: the proxy scope's DoReMiConfig.eta.
  methods: "doremi" (offline, always) and some of "online_doremi", "odm", "schedule" (see
    _method_runs): one main run each, judged like DoReMi's, offline DoReMi a baseline too.
  """
  _validate(domain_set, baselines, max_rounds, natural_weights, etas)
  _validate_methods(methods, schedule_switch)
  natural, token_counts = _natural(domain_set, sequence_length, cache_dir, natural_weights)
  ref_w, etas = _reference_weights(reference_weights, natural, domain_set), _etas(etas)
  seeds, studies = list(seeds) if seeds else [None], {}
  compute = (main_steps, main_batch_size, sequence_length)
  bases = {
      b:
          _baseline_weights(b, natural, token_counts, main_tokens=math.prod(compute),
                            unimax_max_epochs=unimax_max_epochs) for b in baselines
  }
  rounds_of = functools.partial(_doremi_rounds, domain_set=domain_set, ref_w=ref_w,
                                max_rounds=max_rounds, convergence_tol=convergence_tol)
  kinds = _stage_kinds(len(seeds), len(etas), max_rounds, len(baselines) + len(methods) - 1)
  with metrics_lib.StudyProgress(kinds):
    for seed in seeds:
      seed_dir, stage_args = _seed_stage(pipeline_dir, seeds, seed, sequence_length, cache_dir)
      run_main = functools.partial(_main_runs, seed_dir, domain_set, stage_args=stage_args,
                                   train_steps=main_steps, batch_size=main_batch_size)
      base_results = None
      for eta in etas:
        tag = "" if len(etas) == 1 else f"_eta{eta:g}"
        rounds, converged = rounds_of(seed_dir, stage_args=stage_args, eta=eta, tag=tag)
        out_w = rounds[-1]["output_weights"]
        _write_weights(
            os.path.join(seed_dir, f"domain_weights{tag}.json"), out_w, domain_set, rounds,
            converged)
        results = {"doremi": run_main({f"doremi{tag}": out_w})[f"doremi{tag}"]}
        base_results = base_results or run_main(bases)  # shared by the etas
        method_results = _method_runs(methods, run_main, seed_dir, natural=natural, doremi_w=out_w,
                                      tag=tag, steps=main_steps, switch_fraction=schedule_switch)
        studies[(seed, eta)] = _study(
            name or os.path.basename(os.path.normpath(pipeline_dir)), domain_set, rounds, converged,
            {
                **results,
                **base_results
            }, _study_config(seed_dir, reference_weights, max_rounds,
                             tag=tag), compute, seed=seed, eta=eta, methods=method_results)
  return _finish(studies, pipeline_dir)


def _etas(etas) -> list:
  """The DoReMi step sizes of the study: pipeline.etas, or the proxy scope's eta."""
  return list(etas) if etas else [_scoped_doremi().eta]


def _seed_stage(pipeline_dir: str, seeds: list, seed, sequence_length: int, cache_dir):
  """(the seed's directory, the train arguments every stage of that seed shares)."""
  seed_dir = pipeline_dir if len(seeds) == 1 else os.path.join(pipeline_dir, f"seed{seed}")
  stage_args = {"task_feature_lengths": {"targets": sequence_length}, "cache_dir": cache_dir}
  stage_args.update({} if seed is None else {"random_seed": int(seed)})
  return seed_dir, stage_args


def _stage_kinds(num_seeds: int, num_etas: int, max_rounds: int, num_other_mains: int) -> list:
  """The kinds of the study's stages in the order they run (all rounds, if none converges);
  None for a stage that finds its run finished: the etas after the first share round 1's
  reference (several etas run one round). num_other_mains: baselines and other methods."""
  first = ["reference", "proxy"] * max_rounds + ["main"]
  return (first + [None, "proxy", "main"] * (num_etas - 1) + ["main"] * num_other_mains) * num_seeds


def _study(name, domain_set, rounds, converged, results, config, compute, *, seed, eta,
           methods=None) -> dict:
  steps, batch, length = compute
  return {
      "methods": methods or {},
      "name": name,
      "mixture": domain_set,
      "domains": data_lib.domain_names(domain_set),
      "rounds": rounds,
      "converged": converged,
      "mains": results,
      "config": config,
      "seed": seed,
      "eta": eta,
      "downstream": downstream_eval.describe_runs(results),
      "equal_compute": {
          "train_steps": steps,
          "batch_size": batch,
          "seq_len": length,
          "tokens": steps * batch * length
      }
  }


def _write_weights(path: str, weights: dict, domain_set: str, rounds, converged: bool) -> None:
  from data_pipelines import weights as weights_lib
  if jax.process_index() == 0:
    weights_lib.write_weights(path, weights, mixture=domain_set, rounds=len(rounds),
                              converged=converged)


def _reference_weights(reference_weights: str, natural: dict, domain_set: str) -> dict:
  """Round 1's reference weights: natural, uniform, or a weights file (original or
  sanitized names, missing domains 0, normalized)."""
  from data_pipelines import core
  from data_pipelines import weights as weights_lib
  if reference_weights == "natural":
    return natural
  if reference_weights == "uniform":
    return weights_lib.uniform_weights(data_lib.domain_names(domain_set))
  return core.mixture_rates(
      _register(
          weights_lib.read_weights(reference_weights), f"{domain_set}_reference_file", domain_set))


def _validate(domain_set: str, baselines, max_rounds: int, natural_weights: str, etas) -> None:
  if etas is not None and (not etas or any(not float(e) > 0 for e in etas)):
    raise ValueError(f"pipeline.etas={etas!r}: give positive step sizes, e.g. [1.0, 0.1].")
  if etas is not None and len(etas) > 1 and max_rounds > 1:
    raise ValueError("pipeline.etas with several values runs one DoReMi round per eta: set "
                     "pipeline.max_rounds = 1, or study one eta with iterated rounds.")
  unknown = [b for b in baselines if b not in BASELINES]
  if unknown:
    raise ValueError(f"pipeline.baselines has unknown {unknown}: use some of {BASELINES}.")
  if max_rounds < 1:
    raise ValueError(f"pipeline.max_rounds={max_rounds}: at least one DoReMi round.")
  if natural_weights not in ("registered", "counted"):
    raise ValueError(f"pipeline.natural_weights={natural_weights!r}: use 'registered' or "
                     f"'counted'.")
  _check_downstream(domain_set)


def _check_downstream(domain_set: str) -> None:
  """The main runs' downstream tasks (`main/train.downstream`), checked before the first stage:
  a missing TFDS dataset fails now, with its `tfds build` command, not after the proxy."""
  from data_pipelines import core
  try:
    bound = gin.query_parameter("main/train.downstream") is not None
  except (KeyError, ValueError):  # train has no bindings in the main scope
    bound = False
  if bound:
    with gin.config_scope("main"):
      cfg = downstream_eval.DownstreamConfig()
    cfg.validate()
    downstream_eval.register_tasks(cfg, core.get_domain_set(domain_set).vocabulary)


def _natural(domain_set: str, sequence_length: int, cache_dir, natural_weights: str):
  """(natural weights, train token counts), from the train split's token store: building it
  here (process 0; the others wait for its manifest) serves every stage after."""
  from data_pipelines import core
  from data_pipelines import weights as weights_lib
  from data_pipelines import build_store
  packed = build_store.open_store(domain_set, "train", sequence_length, cache_dir=cache_dir,
                                  process_index=jax.process_index())
  token_counts = {d: packed.num_tokens[d] for d in packed.names}
  if natural_weights == "counted":
    natural = weights_lib.natural_weights(
        domain_set, counts=packed.num_sequences,
        epochs=core.get_domain_set(domain_set).metadata.get("epochs"))
  else:  # token proportions of the set, or published ones (the Pile's baseline)
    natural = core.mixture_rates(f"{domain_set}_natural", natural_counts=token_counts)
  packed.close()
  return natural, token_counts


def _doremi_rounds(pipeline_dir: str, *, domain_set: str, ref_w: dict, stage_args: dict, eta: float,
                   tag: str, max_rounds: int, convergence_tol: float):
  """Reference -> proxy rounds; round r+1's reference trains on round r's output."""
  from data_pipelines import weights as weights_lib
  domains = data_lib.domain_names(domain_set)
  uniform_mixture = _register(
      weights_lib.uniform_weights(domains), f"{domain_set}_proxy", domain_set)
  rounds = []
  for r in range(1, max_rounds + 1):
    ref_dir = os.path.join(pipeline_dir, f"round{r}", "reference")
    proxy_dir = os.path.join(pipeline_dir, f"round{r}", f"doremi{tag}")
    ref_mixture = _register(ref_w, f"{domain_set}_reference_r{r}", domain_set)
    _scoped_train("reference", ref_dir, ref_mixture, **stage_args)
    _scoped_train("proxy", proxy_dir, uniform_mixture, doremi=_scoped_doremi(eta),
                  reference_dir=ref_dir, **stage_args)
    out = outputs.read_json(os.path.join(proxy_dir, outputs.DOMAIN_WEIGHTS))
    out_w = out["domains"]
    change = max(abs(out_w[d] - ref_w[d]) for d in domains)
    rounds.append({
        "round": r,
        "reference_weights": ref_w,
        "output_weights": out_w,
        "trajectory": _trajectory(proxy_dir),
        "max_abs_change": change,
        "diagnostics": out.get("diagnostics")
    })
    logging.info("DoReMi round %d: max |avg - ref| = %.4g", r, change)
    if change < convergence_tol:
      return rounds, True
    ref_w = out_w
  return rounds, False


def _main_runs(pipeline_dir: str, domain_set: str, mains: dict, *, stage_args: dict,
               train_steps: int, batch_size: int, overrides: Optional[dict] = None) -> dict:
  """One main model per weights at equal compute: {run: {weights, evals}}. overrides:
  {run: train arguments} of runs whose weights change (online, schedule); their weights are
  the start, and the result adds the weights in force at each step."""
  results = {}
  for run, weights in mains.items():
    mixture = _register(weights, f"{domain_set}_main_{run}", domain_set)
    main_dir = os.path.join(pipeline_dir, "main", run)
    extra = (overrides or {}).get(run, {})
    _scoped_train("main", main_dir, mixture, train_steps=train_steps, batch_size=batch_size,
                  **stage_args, **extra)
    results[run] = {"weights": weights, "evals": evaluation.read_history(main_dir)}
    if extra:
      results[run].update(_changing_weights(main_dir))
    downstream = downstream_eval.read_history(main_dir)
    if downstream:
      results[run]["downstream"] = downstream
  return results


def _validate_methods(methods, schedule_switch: float) -> None:
  unknown = [m for m in methods if m not in METHODS]
  if unknown or "doremi" not in methods:
    raise ValueError(f"pipeline.methods={list(methods)!r}: use some of {METHODS}, with "
                     f"'doremi' (offline DoReMi) among them.")
  if "schedule" in methods and not 0.0 < schedule_switch < 1.0:
    raise ValueError(f"pipeline.schedule_switch={schedule_switch}: the fraction of the main "
                     f"steps after which the schedule switches to DoReMi's weights, in (0, 1).")


def _online_config(method: str):
  """The main scope's OnlineMixing settings, for this method."""
  with gin.config_scope("main"):
    return train_lib.OnlineMixing(method=method)


def _method_runs(methods, run_main, seed_dir: str, *, natural: dict, doremi_w: dict, tag: str,
                 steps: int, switch_fraction: float) -> dict:
  """The main runs of the methods whose weights change during the run: {method: result}.

  "online_doremi": the main model's excess over round 1's reference, from uniform weights
  (`main/OnlineMixing.*` settings), resampling its batches; "online_doremi_reweight": the
  paper's objective on the main model instead (a DoReMi proxy step: stratified batches, the
  loss reweighted, the same eta and c); "odm": EXP3 on the training loss, from uniform;
  "schedule": natural weights, then offline DoReMi's from switch_fraction of the steps.
  """
  uniform = {d: 1.0 for d in natural}
  reference_dir = os.path.join(seed_dir, "round1", "reference")
  online = _online_config("doremi")
  plan = {}
  if "online_doremi" in methods:
    plan["online_doremi"] = (uniform, {"online": online, "reference_dir": reference_dir})
  if "online_doremi_reweight" in methods:
    proxy = train_lib.DoReMiConfig(eta=online.eta, smoothing=online.smoothing)
    plan["online_doremi_reweight"] = (uniform, {"doremi": proxy, "reference_dir": reference_dir})
  if "odm" in methods:
    plan["odm"] = (uniform, {"online": _online_config("odm")})
  if "schedule" in methods:
    switch = min(steps - 1, max(1, int(round(switch_fraction * steps))))
    stages = schedule_lib.MixtureSchedule([(0, natural), (switch, doremi_w)])
    plan[f"schedule{tag}"] = (natural, {"sampling": stages})
  results = run_main({
      k: w for k, (w, _) in plan.items()
  }, overrides={
      k: o for k, (_, o) in plan.items()
  })
  for name in ("online_doremi", "online_doremi_reweight"):
    if name in results:
      results[name]["cost"] = _reference_forward_cost(
          os.path.join(seed_dir, "main", name), reference_dir)
      results[name]["setting"] = f"eta {online.eta:g}, c {online.smoothing:g}"
  if f"schedule{tag}" in results:
    results["schedule"] = results.pop(f"schedule{tag}")
    results["schedule"]["setting"] = (f"natural for steps 1-{switch}, DoReMi's weights from step "
                                      f"{switch + 1} of {steps}")
  return results


def _reference_forward_cost(main_dir: str, reference_dir: str) -> Optional[dict]:
  """Online DoReMi's extra compute per step: the reference's forward FLOPs as a fraction of
  a main train step's (forward + backward), from the two runs' models."""
  infos = [outputs.read_run_info(d) for d in (main_dir, reference_dir)]
  if None in infos:
    return None
  main, ref = (config_from_info(i["model"]) for i in infos)
  length = infos[0]["sequence_length"]
  fraction = ref.flops_per_token(length) / 3 / main.flops_per_token(length)
  return {
      "reference_forward_fraction": fraction,
      "reference_params": infos[1]["num_params"],
      "main_params": infos[0]["num_params"]
  }


def _changing_weights(main_dir: str) -> dict:
  """The weights in force at each step (a DoReMi-run's loss weights), their mean, and
  online.json if any."""
  rows = mixing_log.read(main_dir)
  if not rows:  # online_doremi_reweight: a DoReMi step on the main model
    domains = outputs.read_run_info(main_dir)["domains"]
    rows = [{
        "step": r["step"],
        "weights": dict(zip(domains, r["domain_weights"]))
    } for r in metrics_lib.read_trajectory(main_dir)]
  out = {"trajectory": rows, "weights": mixing_log.mean_weights(rows)}
  online = os.path.join(main_dir, outputs.ONLINE)
  if outputs.exists(online):
    out["online"] = outputs.read_json(online)
  return out


def _finish(studies: dict, pipeline_dir: str):
  """study.json, the report(s) and the console verdicts (process 0); the summary.

  One (seed, eta): report.md as always. Several: one report per (seed, eta) under
  reports/, and report.md and summary.json with the verdicts over seeds for each eta.
  """
  if jax.process_index() != 0:
    return None
  if len(studies) == 1:
    study = next(iter(studies.values()))
    outputs.write_json(os.path.join(pipeline_dir, outputs.STUDY), study)
    summary = _write_report(study, pipeline_dir)
    print(console_summary(summary, os.path.join(pipeline_dir, outputs.REPORT)), flush=True)
    return summary
  summaries = {}
  for (seed, eta), study in studies.items():
    key = (f"seed{seed}_" if seed is not None else "") + f"eta{eta:g}"
    sub = os.path.join(pipeline_dir, "reports", key)
    outputs.write_json(os.path.join(sub, outputs.STUDY), study)
    summaries[key] = _write_report(study, sub)
  summary = aggregate.write(studies, summaries, pipeline_dir)
  print(aggregate.console(summary, os.path.join(pipeline_dir, outputs.REPORT)), flush=True)
  return summary


def console_summary(summary: dict, report_path: str) -> str:
  """The verdicts in a few lines, for the terminal, then every flag the report raises."""
  lines = [
      f"DoReMi study {summary['name']} (one seed: provisional verdicts): DoReMi weights " +
      ", ".join(f"{d} {w:.3f}" for d, w in summary["doremi_weights"].items())
  ]
  downstream = summary.get("downstream") or {}
  nd = downstream.get("decimals", 1)
  for name, b in summary.get("baselines", {}).items():
    reach = (f"reaches its final average at {b['fraction_of_steps']:.0%} of the steps"
             if b.get("fraction_of_steps") is not None else "never reaches its final average")
    lines.append(
        f"  vs {name}: average {b['verdict_average']} ({_nats(b['delta_average'])}), worst "
        f"case {b['verdict_worst']} ({_nats(b['delta_worst'])}), better on "
        f"{b['domains_better']}/{b['num_domains']} domains, {reach}")
    ds = (downstream.get("baselines") or {}).get(name)
    if ds:
      lines.append(f"    downstream exact match {report_lib.pct(ds['delta_average'], nd, '+')} "
                   f"points, higher on {ds['tasks_better']}/{ds['num_tasks']} tasks")
  lines += [f"warning: {f}" for f in report_lib.flags(summary)]
  lines.append(f"report: {report_path}")
  return "\n".join(lines)


def _nats(delta) -> str:
  return "the baseline diverged" if delta is None else f"{delta:+.4f} nats"


def _scoped_doremi(eta: Optional[float] = None):
  """The proxy scope's DoReMiConfig, with another eta when given."""
  with gin.config_scope("proxy"):
    cfg = train_lib.DoReMiConfig()
  return cfg if eta is None else dataclasses.replace(cfg, eta=float(eta))


def _study_config(pipeline_dir: str, reference_weights: str, max_rounds: int, *,
                  tag: str = "") -> dict:
  cfg = {"reference_weights": reference_weights, "max_rounds": max_rounds}
  for stage in ("reference", "doremi", "main"):
    path = os.path.join(pipeline_dir, "round1" if stage != "main" else "main", {
        "reference": "reference",
        "doremi": f"doremi{tag}",
        "main": f"doremi{tag}"
    }[stage], outputs.RUN_INFO)
    if outputs.exists(path):
      info = outputs.read_json(path)
      m = info["model"]
      cfg[f"{stage}_model"] = (f"d{m['emb_dim']} L{m['num_layers']} H{m['num_heads']} "
                               f"ff{m['mlp_dim']} ({info['num_params']:,} params)")
      cfg["vocabulary"] = f"{info['vocabulary']['type']} ({info['vocabulary']['vocab_size']})"
  dw = os.path.join(pipeline_dir, "round1", f"doremi{tag}", outputs.DOMAIN_WEIGHTS)
  if outputs.exists(dw):
    meta = outputs.read_json(dw)
    cfg.update(eta=meta["eta"], c=meta["c"], objective=meta["objective"], proxy_steps=meta["steps"])
  return cfg


def main(argv=None):
  config_lib.run_main(pipeline, argv)
