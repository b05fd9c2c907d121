"""Study report: DoReMi's main model against baselines, as report.md, summary.json, plots.

`compute_summary` is pure (study dict in, JSON-ready dict out); `write_report` renders it.
Imports numpy, matplotlib (object API, Agg canvas, no pyplot state) and json only.

Verdict rule (log-perplexity in nats/token, lower is better): delta = doremi - baseline;
"equal" when |delta| <= tolerance * |baseline| (default 0.5% relative), otherwise "better"
(delta < 0) or "worse" (delta > 0). With one seed per run, differences under the tolerance
are noise. A non-finite DoReMi value is "diverged" (counts as worse); a non-finite baseline
value (the baseline diverged) makes DoReMi "better".
"""
import json
import math
import os

import matplotlib
from matplotlib.figure import Figure
import numpy as np

from doremi_jax import curves
from doremi_jax import report_diagnostics
from doremi_jax import report_downstream
from doremi_jax import report_flags
from doremi_jax import report_methods

DOREMI = curves.DOREMI
steps_to_reach = curves.steps_to_reach
pct = report_downstream.pct
flags = report_flags.flags
DEFAULT_TOLERANCE = 0.005
_PAPER_SCALE = "a 280M proxy and an 8B main model, 200k steps each, on The Pile"

_num = curves.num


def _clean(x):
  """JSON-safe number: None for NaN/inf."""
  x = _num(x)
  return x if math.isfinite(x) else None


def verdict(doremi, baseline, tolerance=DEFAULT_TOLERANCE):
  """Compares two log-perplexities: {verdict, delta (doremi - baseline), relative}."""
  d, b = _num(doremi), _num(baseline)
  if not math.isfinite(d):
    return {"verdict": "diverged", "delta": None, "relative": None}
  if not math.isfinite(b):
    return {"verdict": "better", "delta": None, "relative": None}
  delta = d - b
  relative = delta / abs(b) if b else (0.0 if delta == 0 else math.copysign(math.inf, delta))
  if abs(delta) <= tolerance * abs(b):
    v = "equal"
  else:
    v = "better" if delta < 0 else "worse"
  return {"verdict": v, "delta": delta, "relative": _clean(relative)}


def _eval_value(e, key):
  """An eval point's 'average' or 'worst', computed from per_domain when absent."""
  if key in e:
    return _num(e[key])
  vals = [_num(v) for v in e.get("per_domain", {}).values()]
  if not vals:
    return float("nan")
  return float(np.mean(vals) if key == "average" else np.max(vals))


def _final(main, domains):
  """Final eval of one main run: per-domain, average, worst, diverged flag."""
  evals = main.get("evals") or []
  if not evals:
    raise ValueError("main run has no evals")
  last = evals[-1]
  per = {d: _num(last.get("per_domain", {}).get(d)) for d in domains}
  avg, worst = _eval_value(last, "average"), _eval_value(last, "worst")
  finite = {d: v for d, v in per.items() if math.isfinite(v)}
  diverged = not (math.isfinite(avg) and math.isfinite(worst) and len(finite) == len(per))
  return {
      "step": _num(last.get("step")),
      "per_domain": per,
      "average": avg,
      "worst": worst,
      "worst_domain": max(finite, key=finite.get) if finite else None,
      "diverged": diverged
  }


def _compare(doremi, base_final, domains, total_steps, tolerance):
  """One baseline's comparison entry (DoReMi's main run `doremi` against it)."""
  df = doremi["final"]
  va = verdict(df["average"], base_final["average"], tolerance)
  vw = verdict(df["worst"], base_final["worst"], tolerance)
  better = sum(
      1 for d in domains
      if math.isfinite(df["per_domain"][d]) and (not math.isfinite(base_final["per_domain"][d]) or
                                                 df["per_domain"][d] < base_final["per_domain"][d]))
  evals = doremi["evals"]
  reach = steps_to_reach([e.get("step") for e in evals], [_eval_value(e, "average") for e in evals],
                         base_final["average"])
  fraction = reach / total_steps if reach is not None and total_steps else None
  speedup = total_steps / reach if reach and total_steps else None
  return {
      "verdict_average": va["verdict"],
      "verdict_worst": vw["verdict"],
      "delta_average": va["delta"],
      "delta_worst": vw["delta"],
      "relative_average": va["relative"],
      "relative_worst": vw["relative"],
      "domains_better": better,
      "num_domains": len(domains),
      "baseline_diverged": base_final["diverged"],
      "target_average": _clean(base_final["average"]),
      "steps_to_reach": reach,
      "fraction_of_steps": fraction,
      "speedup": speedup
  }


def _json_safe(x):
  """Recursively replaces non-finite floats with None."""
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (bool, str)) or x is None:
    return x
  if isinstance(x, (int, float, np.number)):
    return _clean(x) if isinstance(x, (float, np.floating)) else int(x)
  return x


def compute_summary(study, tolerance=DEFAULT_TOLERANCE):
  """Pure: the study's verdicts and numbers as a JSON-ready dict."""
  domains = list(study["domains"])
  mains = study.get("mains", {})
  finals = {name: _final(m, domains) for name, m in mains.items()}
  last_steps = [f["step"] for f in finals.values() if math.isfinite(f["step"])]
  total = _num(study.get("equal_compute", {}).get("train_steps"))
  if not (math.isfinite(total) and total > 0):
    total = max(last_steps) if last_steps else float("nan")
  rounds = study.get("rounds", [])
  if DOREMI in mains:
    weights = mains[DOREMI].get("weights")
  else:
    weights = rounds[-1].get("output_weights") if rounds else None
  baselines = {}
  if DOREMI in mains:
    doremi = {"final": finals[DOREMI], "evals": mains[DOREMI]["evals"]}
    for name in mains:
      if name != DOREMI:
        baselines[name] = _compare(doremi, finals[name], domains, total, tolerance)
  beats_all = bool(baselines) and all(
      b["verdict_average"] == "better" and b["verdict_worst"] == "better"
      for b in baselines.values())
  return _json_safe({
      "name": study.get("name"),
      "mixture": study.get("mixture"),
      "domains": domains,
      "tolerance": tolerance,
      "reference_run": DOREMI,
      "has_doremi": DOREMI in mains,
      "total_steps": total,
      "num_rounds": len(rounds),
      "converged": bool(study.get("converged", False)),
      "max_abs_change": rounds[-1].get("max_abs_change") if rounds else None,
      "diagnostics": rounds[-1].get("diagnostics") if rounds else None,
      "seed": study.get("seed"),
      "doremi_weights": weights,
      "final": finals,
      "baselines": baselines,
      "better_than_all_baselines": beats_all,
      "downstream": report_downstream.compute(study),
      "methods": report_methods.compute(study, lambda sub: compute_summary(sub, tolerance), DOREMI),
  })


# ---------------------------------------------------------------- markdown


def _f(x, nd=4):
  x = _num(x)
  return f"{x:.{nd}f}" if math.isfinite(x) else "NaN (diverged)"


def _table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def _flatten(d, prefix=""):
  out = []
  for k, v in d.items():
    if isinstance(v, dict):
      out += _flatten(v, f"{prefix}{k}.")
    else:
      out.append((f"{prefix}{k}", v))
  return out


def _verdict_text(v, delta, rel, tol):
  if v == "diverged":
    return "**diverged** (DoReMi's value is NaN: worse)"
  if delta is None:
    return f"**{v}** (the baseline diverged)"
  size = f"{abs(delta):.4f} nats ({abs(rel or 0) * 100:.2f}%)"
  if v == "equal":
    return f"**equal**: differs by {size}, within the {tol * 100:.2g}% tolerance"
  return f"**{v}** by {size}"


def _reach_text(name, b):
  if b["baseline_diverged"] and b["target_average"] is None:
    return f"{name} diverged: no final average to reach"
  if b["steps_to_reach"] is None:
    return f"never reached {name}'s final average within the run"
  text = f"reaches {name}'s final average at step {b['steps_to_reach']:.0f}"
  if b["fraction_of_steps"] is not None:
    text += f", {b['fraction_of_steps'] * 100:.0f}% of steps"
  if b["speedup"] is not None:
    text += f" ({b['speedup']:.2f}x)"
  return text


def _header_md(study, s):
  ec = study.get("equal_compute", {})
  mac = "n/a" if s["max_abs_change"] is None else f"{s['max_abs_change']:.4g}"
  lines = [
      f"# DoReMi study: {s['name']}", "",
      f"Mixture `{s['mixture']}` with {len(s['domains'])} domains. DoReMi ran "
      f"{s['num_rounds']} round(s) (converged: {'yes' if s['converged'] else 'no'}; "
      f"last max |avg - ref| = {mac}). Main models: " +
      ", ".join(f"`{n}`" for n in study.get("mains", {})) + "."
  ]
  if ec:
    lines += [
        "", f"Equal compute per main model: {ec.get('train_steps')} steps x "
        f"{ec.get('batch_size')} sequences x {ec.get('seq_len')} tokens = "
        f"{ec.get('tokens')} tokens."
    ]
  cfg = _flatten(study.get("config", {}))
  if cfg:
    lines += ["", "## Configuration", "", _table(["key", "value"], cfg)]
  return "\n".join(lines)


def _weights_md(study, s):
  rounds, mains, domains = study.get("rounds", []), study.get("mains", {}), s["domains"]
  cols, header = [], []
  if rounds:
    cols.append(rounds[0].get("reference_weights", {}))
    header.append("reference")
    for r in rounds:
      cols.append(r.get("output_weights", {}))
      header.append(f"DoReMi round {r.get('round')}")
  for n, m in mains.items():
    cols.append(m.get("weights", {}))
    header.append(f"main `{n}`")
  rows = [[d] + [_f(c.get(d), 4) if d in c else "-" for c in cols] for d in domains]
  return "## Domain weights\n\n" + _table(["domain"] + header, rows)


def _ppl_md(s):
  names = list(s["final"])

  def row(label, vals):
    fin = [v for v in vals if math.isfinite(_num(v))]
    best = min(fin) if fin else None
    return [label
           ] + [f"**{_f(v)}**" if best is not None and _num(v) == best else _f(v) for v in vals]

  rows = [row(d, [s["final"][n]["per_domain"][d] for n in names]) for d in s["domains"]]
  rows.append(row("**average**", [s["final"][n]["average"] for n in names]))
  rows.append(row("**worst**", [s["final"][n]["worst"] for n in names]))
  return ("## Final held-out log-perplexity (nats/token; lower is better, best in bold)\n\n" +
          _table(["domain"] + [f"`{n}`" for n in names], rows))


def _comparison_md(s):
  tol = s["tolerance"]
  lines = [
      "## DoReMi against each baseline", "",
      "Verdicts from one seed are **provisional**: run `pipeline.seeds` for verdicts "
      "tested against the spread over seeds.", ""
  ]
  if not s["has_doremi"]:
    return "\n".join(lines + ["No `doremi` main model in this study: no comparison."])
  if not s["baselines"]:
    return "\n".join(lines + ["No baselines in this study: no comparison."])
  lines += [
      f"Verdict rule: difference = DoReMi - baseline; **equal** when |difference| <= "
      f"{tol * 100:.2g}% of the baseline's value (the tolerance), else **better** "
      "(lower) or **worse**. Each run has one seed, so differences under the tolerance "
      "are noise. A NaN (diverged) DoReMi value counts as worse.", ""
  ]
  rows = []
  for n, b in s["baselines"].items():
    rows.append([
        f"`{n}`",
        _verdict_text(b["verdict_average"], b["delta_average"], b["relative_average"], tol),
        _verdict_text(b["verdict_worst"], b["delta_worst"], b["relative_worst"], tol),
        f"better on {b['domains_better']}/{b['num_domains']} domains",
        _reach_text(n, b)
    ])
  lines.append(
      _table(["baseline", "average", "worst case", "domains", "steps to reach "
              "baseline"], rows))
  lines += [
      "", "Steps to reach: the first step, linearly interpolated between eval points, "
      "at which DoReMi's average log-perplexity is at most the baseline's final "
      f"average; fractions are of {_f(s['total_steps'], 0)} total steps."
  ]
  return "\n".join(lines)


_PAPER_STEPS = 200_000


def _scale_text(s):
  steps = _num(s["total_steps"])
  share = (f" ({steps / _PAPER_STEPS:.2%} of the paper's)"
           if math.isfinite(steps) and steps < _PAPER_STEPS else "")
  return (f"Scale matters too: the paper used {_PAPER_SCALE}; this study ran "
          f"{_f(steps, 0)} steps per main model{share}, and results at another scale need "
          "not transfer in either direction. Each run has one seed: the verdicts are "
          "provisional (pipeline.seeds runs several and tests the differences).")


def _closing_md(s):
  scale = _scale_text(s)
  indep = ("independent studies (Aioli, ICLR 2025; UtiliMax, 2025) found that DoReMi often "
           "fails to beat simple stratified (uniform) or token-count baselines outside the "
           "paper's setup")
  if not s["baselines"]:
    return "## Conclusion\n\nNo baseline comparison was possible. " + scale
  if s["better_than_all_baselines"]:
    text = ("DoReMi's main model beat every baseline on both average and worst-case "
            "log-perplexity in this study. Treat this with care: " + indep + ". " + scale)
  else:
    text = ("**DoReMi did not beat every baseline in this study.** It was not better on both "
            "average and worst-case log-perplexity than: " + ", ".join(_misses(s)) + ". This "
            "is not unusual: " + indep + ". " + scale)
  return "## Conclusion\n\n" + text


def _misses(s):
  return [
      f"`{n}` (average: {b['verdict_average']}, worst case: {b['verdict_worst']})"
      for n, b in report_flags.flagged_baselines(s)
  ]


def render_markdown(study, summary, plots):
  """report.md text; `plots` maps plot name to a path relative to report.md."""
  glance = report_flags.glance_md(summary)
  parts = [_header_md(study, summary)
          ] + ([glance] if glance else []) + [_weights_md(study, summary)]
  if "weights" in plots:
    parts.append(f"![final weights]({plots['weights']})")
  if "trajectories" in plots:
    parts.append(f"Weight trajectories (thin: current weights; thick: running average):\n\n"
                 f"![domain weight trajectories]({plots['trajectories']})")
  parts.append(_ppl_md(summary))
  if "final_ppl" in plots:
    parts.append(f"![final log-perplexity minus the baseline's]({plots['final_ppl']})")
  if "curves" in plots:
    parts.append(f"![log-perplexity against steps]({plots['curves']})")
  diag = report_diagnostics.section_md(study, summary, plots.get("moving_average"))
  parts += ([diag] if diag else []) + [_comparison_md(summary)]
  downstream = report_downstream.section_md(study, summary["downstream"],
                                            plots.get("downstream_curves"))
  parts += [downstream] if downstream else []
  methods = report_methods.section_md(summary, plots.get("weights_in_force"), _table, _verdict_text)
  parts += ([methods] if methods else []) + [_closing_md(summary)]
  return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- plots


def _colors(n):
  """n distinct colors: tab10, tab20, then an evenly spaced hsv."""
  if n <= 20:
    cm = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cm(i) for i in range(n)]
  return [matplotlib.colormaps["hsv"](i / n) for i in range(n)]


def _save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def _plot_trajectories(study, domains, path):
  rounds = [r for r in study.get("rounds", []) if (r.get("trajectory") or {}).get("domain_weights")]
  if not rounds:
    return None
  colors = _colors(len(domains))
  fig = Figure(figsize=(5.5 * len(rounds) + 2.5, 4.5))
  axes = fig.subplots(1, len(rounds), squeeze=False, sharey=True)[0]
  for ax, r in zip(axes, rounds):
    t = r["trajectory"]
    steps = t.get("steps") or list(range(len(t["domain_weights"])))
    dw, avg = np.asarray(t["domain_weights"], float), t.get("avg_domain_weights")
    for i, d in enumerate(domains):
      ax.plot(steps, dw[:, i], color=colors[i], lw=0.8, alpha=0.6)
      if avg:
        ax.plot(steps, np.asarray(avg, float)[:, i], color=colors[i], lw=2.5, label=d)
      else:
        ax.lines[-1].set_label(d)
    ax.set_title(f"round {r.get('round')}")
    ax.set_xlabel("proxy step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("domain weight (thin: current, thick: average)")
  axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
  return _save(fig, path)


def _bar_chart(groups, series, ylabel, title, path, errors=None):
  """Grouped bars, series: {label: [value per group]}; NaN bars are marked 'NaN'; errors:
  {label: [half-height of an error bar per group]} (over-seed spread)."""
  return _save(bar_figure(groups, series, ylabel, title, errors), path)


def bar_figure(groups, series, ylabel, title, errors=None):
  fig = Figure(figsize=(max(7.0, 0.9 * len(groups) + 2), 4.5))
  ax = fig.subplots()
  x, w = np.arange(len(groups)), 0.8 / max(len(series), 1)
  for j, (color, (label, vals)) in enumerate(zip(_colors(len(series)), series.items())):
    vals = np.asarray([_num(v) for v in vals])
    pos = x - 0.4 + w * (j + 0.5)
    err = (errors or {}).get(label)
    ax.bar(pos, np.where(np.isfinite(vals), vals, 0.0), w, label=label, color=color,
           yerr=None if err is None else np.nan_to_num(np.asarray(err, float)), capsize=3)
    for p in pos[~np.isfinite(vals)]:
      ax.text(p, 0, "NaN", rotation=90, ha="center", va="bottom", fontsize=7, color="red")
  tilt = len(groups) > 4
  ax.set_xticks(x)
  ax.set_xticklabels(groups, rotation=45 if tilt else 0, ha="right" if tilt else "center",
                     fontsize=8)
  ax.set(ylabel=ylabel, title=title)
  ax.axhline(0.0, color="black", lw=0.8)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def final_ppl_figure(summary):
  """Each run's final log-perplexity minus the baseline's (curves.baseline_of), per domain,
  average and worst case: the differences are the point, not values near 3 nats."""
  final, domains = summary["final"], summary["domains"]
  base = curves.baseline_of(list(final))
  if base is None:
    return None
  keys = domains + ["average", "worst"]

  def values(f):
    return np.asarray([_num(f["per_domain"][d]) for d in domains] +
                      [_num(f["average"]), _num(f["worst"])])

  series = {n: values(f) - values(final[base]) for n, f in final.items() if n != base}
  return bar_figure(keys, series, f"minus {base} (nats/token)",
                    f"Final held-out log-perplexity minus {base}'s (below 0: better)")


def _plot_final_ppl(summary, path):
  fig = final_ppl_figure(summary)
  return None if fig is None else _save(fig, path)


def curves_figure(study):
  """Average log-perplexity against steps (left) and each run's minus the baseline's at the
  same steps (right), every line in its own style (curves.line_style)."""
  mains = study.get("mains", {})
  base = curves.baseline_of(list(mains))
  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2 if base else 1, squeeze=False)[0]
  base_at = {} if base is None else {
      _num(e.get("step")): _eval_value(e, "average") for e in mains[base]["evals"]
  }
  for j, (color, (n, m)) in enumerate(zip(_colors(len(mains)), mains.items())):
    steps = [_num(e.get("step")) for e in m["evals"]]
    vals = [_eval_value(e, "average") for e in m["evals"]]
    axes[0].plot(steps, vals, color=color, label=n, **curves.line_style(j))
    if base and n != base:
      diff = [(s, v - base_at[s]) for s, v in zip(steps, vals) if s in base_at]
      axes[1].plot([s for s, _ in diff], [d for _, d in diff], color=color, label=n,
                   **curves.line_style(j))
  axes[0].set(title="average log-perplexity", ylabel="nats/token")
  if base:
    axes[1].axhline(0.0, color="black", lw=0.8)
    axes[1].set(title=f"average minus {base}'s (below 0: better)", ylabel="nats/token")
  for ax in axes:
    ax.set_xlabel("main-model step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return fig


def _plot_curves(study, path):
  return _save(curves_figure(study), path)


def _plot_weights(study, summary, path):
  domains = summary["domains"]
  series = {
      n: [m["weights"].get(d)
          for d in domains] for n, m in study.get("mains", {}).items() if m.get("weights")
  }
  if not series:
    return None
  return _bar_chart(domains, series, "sampling weight", "Domain weights of each main model", path)


def write_plots(study, summary, plot_dir):
  """Writes the PNGs into plot_dir; returns {name: file name} for those written."""
  os.makedirs(plot_dir, exist_ok=True)
  made = {
      "trajectories":
          _plot_trajectories(study, summary["domains"],
                             os.path.join(plot_dir, "weight_trajectories.png")),
      "final_ppl":
          _plot_final_ppl(summary, os.path.join(plot_dir, "final_log_ppl.png")),
      "curves":
          _plot_curves(study, os.path.join(plot_dir, "log_ppl_vs_steps.png")),
      "weights":
          _plot_weights(study, summary, os.path.join(plot_dir, "final_weights.png")),
      "moving_average":
          report_diagnostics.plot_moving_average(study, summary["domains"],
                                                 os.path.join(plot_dir, "weights_moving_avg.png"),
                                                 Figure, _colors),
      "downstream_curves":
          report_downstream.plot_curves(study, os.path.join(plot_dir, "downstream_vs_steps.png")),
      "weights_in_force":
          report_methods.plot_weights_in_force(study, os.path.join(plot_dir,
                                                                   "weights_in_force.png"), Figure,
                                               _colors),
  }
  return {k: os.path.basename(v) for k, v in made.items() if v}


def write_report(study, out_dir, tolerance=DEFAULT_TOLERANCE):
  """Writes out_dir/report.md, out_dir/summary.json, out_dir/plots/*.png; returns summary."""
  summary = compute_summary(study, tolerance)
  os.makedirs(out_dir, exist_ok=True)
  plots = write_plots(study, summary, os.path.join(out_dir, "plots"))
  rel = {k: f"plots/{v}" for k, v in plots.items()}
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(render_markdown(study, summary, rel))
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, allow_nan=False)
  return summary
