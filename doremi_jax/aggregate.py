"""A study over seeds and etas: DoReMi minus each baseline, mean and spread over seeds.

Rule: for each eta and baseline, the per-seed differences d_s = DoReMi - baseline (average
and worst-case log-perplexity, nats/token; lower is better) give a mean, a sample standard
deviation and a standard error sd / sqrt(n). "better" or "worse" only when |mean| > 2 SE;
otherwise "no significant difference". One seed has no spread: "provisional (one seed)".
Steps to reach the baseline's final average are summarized the same way over the seeds
where DoReMi reached it. Downstream exact match (points; higher is better), when the main
runs evaluated downstream tasks, follows the same rule with the sign reversed.
"""
import io
import math
import os
from typing import Mapping, Optional, Sequence

import numpy as np

from doremi_jax import outputs
from doremi_jax import report

PROVISIONAL = "provisional (one seed)"
NO_DIFFERENCE = "no significant difference"


def mean_sd_se(values: Sequence[float]) -> dict:
  """{"n", "mean", "sd", "se"} of finite values (sd and se None for fewer than 2)."""
  x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  n = len(x)
  if n == 0:
    return {"n": 0, "mean": None, "sd": None, "se": None}
  sd = float(np.std(x, ddof=1)) if n > 1 else None
  return {
      "n": n,
      "mean": float(np.mean(x)),
      "sd": sd,
      "se": sd / math.sqrt(n) if sd is not None else None
  }


def significance(stats: Mapping, *, higher_is_better: bool = False) -> str:
  """better / worse beyond two standard errors of the mean difference (lower is better,
  unless higher_is_better)."""
  if stats["n"] == 0:
    return "no data"
  if stats["se"] is None:
    return PROVISIONAL
  if abs(stats["mean"]) > 2 * stats["se"]:
    return "better" if (stats["mean"] > 0) == higher_is_better else "worse"
  return NO_DIFFERENCE


def _reach_stats(reach: list) -> dict:
  stats = mean_sd_se([r for r in reach if r is not None])
  return {**stats, "reached": f"{stats['n']}/{len(reach)} seeds"}


def _downstream(per_seed: Mapping[str, Mapping]) -> dict:
  """{eta: {baseline: {"average", "steps_to_reach"}}} of downstream exact match."""
  cells = {}
  for key, summary in per_seed.items():
    eta = key.rsplit("eta", 1)[1]
    for name, b in ((summary.get("downstream") or {}).get("baselines") or {}).items():
      cell = cells.setdefault(eta, {}).setdefault(name, {"average": [], "reach": []})
      cell["average"].append(b["delta_average"])
      if b.get("reach_status") in ("reached", "never"):  # measured (report_downstream.py)
        cell["reach"].append(b.get("steps_to_reach"))
  out = {}
  for eta, names in cells.items():
    for name, cell in names.items():
      avg = mean_sd_se(cell["average"])
      out.setdefault(eta, {})[name] = {
          "average": {
              **avg, "verdict": significance(avg, higher_is_better=True)
          },
          "steps_to_reach": _reach_stats(cell["reach"])
      }
  return out


def summarize(per_seed: Mapping[str, Mapping]) -> dict:
  """{eta: {baseline: stats}} from {"[seed<s>_]eta<e>": report summary} (report.py)."""
  out = {}
  for key, summary in per_seed.items():
    eta = key.rsplit("eta", 1)[1]
    for name, b in summary.get("baselines", {}).items():
      cell = out.setdefault(eta, {}).setdefault(name, {"average": [], "worst": [], "reach": []})
      cell["average"].append(b["delta_average"])
      cell["worst"].append(b["delta_worst"])
      cell["reach"].append(b.get("steps_to_reach"))
  result = {}
  for eta, names in out.items():
    for name, cell in names.items():
      avg, worst = mean_sd_se(cell["average"]), mean_sd_se(cell["worst"])
      result.setdefault(eta, {})[name] = {
          "average": {
              **avg, "verdict": significance(avg)
          },
          "worst": {
              **worst, "verdict": significance(worst)
          },
          "steps_to_reach": _reach_stats(cell["reach"]),
      }
  return result


def _pm(stats: Mapping, nd: int = 4) -> str:
  if stats["mean"] is None:
    return "-"
  sd = f" ± {stats['sd']:.{nd}f}" if stats["sd"] is not None else ""
  return f"{stats['mean']:+.{nd}f}{sd}"


def _steps(stats: Mapping) -> str:
  if stats["mean"] is None:
    return "never"
  sd = f" ± {stats['sd']:.0f}" if stats["sd"] is not None else ""
  return f"{stats['mean']:.0f}{sd}"


def _downstream_md(downstream: Mapping) -> list:
  """The downstream table of one eta (empty without downstream evaluations)."""
  if not downstream:
    return []
  lines = [
      "Downstream one-shot exact match, DoReMi minus baseline in points (positive: DoReMi "
      "is better), same rule:", "", "| baseline | average exact match | verdict | steps to "
      "reach the baseline's final exact match |", "|---|---|---|---|"
  ]
  for name, st in downstream.items():
    reach = st["steps_to_reach"]
    text = (f"{_steps(reach)} ({reach['reached']})" if reach["reached"] != "0/0 seeds" else
            "- (not measured: a baseline at 0, or one evaluation)")
    lines.append(f"| {name} | {_pm(st['average'], 2)} | {st['average']['verdict']} | {text} |")
  return lines + [""]


def render(studies: Mapping, per_seed: Mapping[str, Mapping], stats: Mapping,
           downstream: Optional[Mapping] = None, plot: Optional[str] = None) -> str:
  """report.md of a study over seeds and etas."""
  first = next(iter(studies.values()))
  seeds = sorted({s for s, _ in studies}, key=str)
  etas = sorted({e for _, e in studies})
  lines = [
      f"# DoReMi study {first['name']}: {len(seeds)} seed(s) x eta {etas}", "",
      f"Domain set `{first['mixture']}`; every stage (reference, proxy, main runs) ran once "
      f"per seed ({', '.join(map(str, seeds))}). DoReMi minus baseline, log-perplexity in "
      "nats/token (negative: DoReMi is better), mean ± sample sd over seeds. A verdict needs "
      "|mean| > 2 standard errors (sd / sqrt(n)); otherwise there is no significant "
      "difference.", ""
  ]
  if plot:
    lines += [f"![DoReMi minus each baseline, mean and sd over seeds]({plot})", ""]
  for eta in stats:
    lines += [
        f"## eta = {eta}", "", "| baseline | average | verdict | worst case | verdict | "
        "steps to reach the baseline's final average |", "|---|---|---|---|---|---|"
    ]
    for name, st in stats[eta].items():
      reach = st["steps_to_reach"]
      lines.append(f"| {name} | {_pm(st['average'])} | {st['average']['verdict']} | "
                   f"{_pm(st['worst'])} | {st['worst']['verdict']} | "
                   f"{_steps(reach)} "
                   f"({reach['reached']}) |")
    lines += [""] + _downstream_md((downstream or {}).get(eta))
    weights = [per_seed[k]["doremi_weights"] for k in per_seed if k.endswith(f"eta{eta}")]
    domains = list(first["domains"])
    mean_w = {d: float(np.mean([w[d] for w in weights])) for d in domains}
    lines += [
        "DoReMi weights (mean over seeds): " + ", ".join(f"{d} {mean_w[d]:.3f}" for d in domains),
        ""
    ]
    diag = [per_seed[k].get("diagnostics") for k in per_seed if k.endswith(f"eta{eta}")]
    unsettled = [k for k, dg in zip(per_seed, diag) if dg and not dg.get("settled", True)]
    if unsettled:
      lines += [
          f"**Weights not settled** in {len(unsettled)} of {len(diag)} runs "
          f"(see each run's report).", ""
      ]
  lines += ["## Each run", ""]
  lines += [f"- [{k}](reports/{k}/report.md)" for k in per_seed]
  return "\n".join(lines) + "\n"


def methods_over_seeds(per_seed: Mapping[str, Mapping]) -> dict:
  """{method: {eta: {baseline: stats}}}: aggregate.summarize on each method's comparisons."""
  names = sorted({m for s in per_seed.values() for m in (s.get("methods") or {})})
  return {
      m:
          summarize({
              k: s["methods"][m] for k, s in per_seed.items() if m in (s.get("methods") or {})
          }) for m in names
  }


def methods_md(stats: Mapping) -> list[str]:
  lines = []
  for method, etas in stats.items():
    for eta, names in etas.items():
      lines += [
          f"### `{method}` (eta {eta} for offline DoReMi)", "",
          "| against | average | verdict | worst case | verdict |", "|---|---|---|---|---|"
      ]
      for name, st in names.items():
        lines.append(f"| {name} | {_pm(st['average'])} | {st['average']['verdict']} | "
                     f"{_pm(st['worst'])} | {st['worst']['verdict']} |")
      lines.append("")
  return (["## Other mixture methods over seeds", ""] + lines) if lines else []


PLOT = "plots/deltas_over_seeds.png"


def deltas_figure(stats: Mapping):
  """DoReMi minus each baseline per eta (average and worst case): the mean over seeds, a bar
  of one sample sd either side."""
  names = list(dict.fromkeys(n for per in stats.values() for n in per))
  if not names:
    return None
  series, errors = {}, {}
  for eta, per in stats.items():
    for key in ("average", "worst"):
      label = f"{key} (eta {eta})"
      cells = [per.get(n, {}).get(key) or {} for n in names]
      series[label] = [c.get("mean") for c in cells]
      errors[label] = [c.get("sd") or 0.0 for c in cells]
  return report.bar_figure(names, series, "DoReMi minus baseline (nats/token)",
                           "DoReMi minus each baseline, mean ± sd over seeds (below 0: better)",
                           errors)


def _write_plot(fig, path: str) -> Optional[str]:
  """The figure as a PNG at path (local or gs://), from process 0."""
  if fig is None or not outputs.is_writer():
    return None
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png", dpi=110)
  outputs.makedirs(os.path.dirname(path))
  with outputs.gfile().GFile(path, "wb") as f:
    f.write(buf.getvalue())
  return path


def write(studies: Mapping, per_seed: Mapping[str, Mapping], out_dir: str) -> dict:
  """report.md and summary.json over seeds and etas; returns the summary."""
  stats, downstream = summarize(per_seed), _downstream(per_seed)
  methods = methods_over_seeds(per_seed)
  summary = {
      "methods": methods,
      "name": next(iter(studies.values()))["name"],
      "etas": stats,
      "downstream": downstream,
      "runs": {
          k: {
              "doremi_weights": s.get("doremi_weights"),
              "diagnostics": s.get("diagnostics"),
              "downstream_at_floor": bool((s.get("downstream") or {}).get("at_floor"))
          } for k, s in per_seed.items()
      }
  }
  plot = _write_plot(deltas_figure(stats), os.path.join(out_dir, PLOT))
  outputs.write_text(
      os.path.join(out_dir, outputs.REPORT),
      render(studies, per_seed, stats, downstream, plot and PLOT) + "\n".join(methods_md(methods)))
  outputs.write_json(os.path.join(out_dir, outputs.SUMMARY), summary)
  return summary


def flags(summary: Mapping) -> list:
  """The warnings over the runs (each run's report has its own): weights that did not settle,
  downstream tasks at the floor."""
  runs = summary.get("runs") or {}
  unsettled = [k for k, r in runs.items() if not (r.get("diagnostics") or {}).get("settled", True)]
  floor = [k for k, r in runs.items() if r.get("downstream_at_floor")]
  out = []
  if unsettled:
    out.append(f"weights not settled in {len(unsettled)} of {len(runs)} runs: "
               f"{', '.join(unsettled)}")
  if floor:
    out.append(f"every main model at the downstream floor in {len(floor)} of {len(runs)} runs: "
               "these tasks do not separate the mixtures")
  return out


def console(summary: Mapping, report_path: str) -> str:
  lines = [f"DoReMi study {summary['name']} over seeds:"]
  for eta, names in summary["etas"].items():
    for name, st in names.items():
      lines.append(f"  eta {eta} vs {name}: average {_pm(st['average'])} "
                   f"({st['average']['verdict']}), worst case {_pm(st['worst'])} "
                   f"({st['worst']['verdict']})")
      ds = (summary.get("downstream") or {}).get(eta, {}).get(name)
      if ds:
        lines.append(f"    downstream exact match {_pm(ds['average'], 2)} points "
                     f"({ds['average']['verdict']})")
  lines += [f"warning: {f}" for f in flags(summary)]
  lines.append(f"report: {report_path}")
  return "\n".join(lines)
