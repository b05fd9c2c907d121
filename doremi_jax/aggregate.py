"""A study over seeds and etas: DoReMi minus each baseline, mean and spread over seeds.

Rule: for each eta and baseline, the per-seed differences d_s = DoReMi - baseline (average
and worst-case log-perplexity, nats/token; lower is better) give a mean, a sample standard
deviation and a standard error sd / sqrt(n). "better" or "worse" only when |mean| > 2 SE;
otherwise "no significant difference". One seed has no spread: "provisional (one seed)".
Steps to reach the baseline's final average are summarized the same way over the seeds
where DoReMi reached it.
"""
import math
import os
from typing import Mapping, Sequence

import numpy as np

from doremi_jax import outputs

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


def significance(stats: Mapping) -> str:
  """better / worse beyond two standard errors of the mean difference (lower is better)."""
  if stats["n"] == 0:
    return "no data"
  if stats["se"] is None:
    return PROVISIONAL
  if abs(stats["mean"]) > 2 * stats["se"]:
    return "better" if stats["mean"] < 0 else "worse"
  return NO_DIFFERENCE


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
      reach = mean_sd_se([r for r in cell["reach"] if r is not None])
      result.setdefault(eta, {})[name] = {
          "average": {
              **avg, "verdict": significance(avg)
          },
          "worst": {
              **worst, "verdict": significance(worst)
          },
          "steps_to_reach": {
              **reach, "reached": f"{reach['n']}/{len(cell['reach'])} seeds"
          },
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


def render(studies: Mapping, per_seed: Mapping[str, Mapping], stats: Mapping) -> str:
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
    weights = [per_seed[k]["doremi_weights"] for k in per_seed if k.endswith(f"eta{eta}")]
    domains = list(first["domains"])
    mean_w = {d: float(np.mean([w[d] for w in weights])) for d in domains}
    lines += [
        "",
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


def write(studies: Mapping, per_seed: Mapping[str, Mapping], out_dir: str) -> dict:
  """report.md and summary.json over seeds and etas; returns the summary."""
  stats = summarize(per_seed)
  summary = {
      "name": next(iter(studies.values()))["name"],
      "etas": stats,
      "runs": {
          k: {
              "doremi_weights": s.get("doremi_weights"),
              "diagnostics": s.get("diagnostics")
          } for k, s in per_seed.items()
      }
  }
  outputs.write_text(os.path.join(out_dir, outputs.REPORT), render(studies, per_seed, stats))
  outputs.write_json(os.path.join(out_dir, outputs.SUMMARY), summary)
  return summary


def console(summary: Mapping, report_path: str) -> str:
  lines = [f"DoReMi study {summary['name']} over seeds:"]
  for eta, names in summary["etas"].items():
    for name, st in names.items():
      lines.append(f"  eta {eta} vs {name}: average {_pm(st['average'])} "
                   f"({st['average']['verdict']}), worst case {_pm(st['worst'])} "
                   f"({st['worst']['verdict']})")
  lines.append(f"report: {report_path}")
  return "\n".join(lines)
