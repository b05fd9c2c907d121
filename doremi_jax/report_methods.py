"""The study's other mixture methods (online DoReMi, ODM, a schedule) beside offline DoReMi.

Each method's main run is judged exactly as DoReMi's is: report.compute_summary runs on the
study with that run in DoReMi's place and offline DoReMi's main run among the baselines, so
per-domain, worst-case, steps-to-reach and downstream verdicts come from one code path.
Here: the markdown section and the weights-in-force plot (aggregate.py: over seeds).
"""
from typing import Callable, Mapping, Optional

OFFLINE = "doremi (offline)"  # offline DoReMi's main run, as a baseline of the other methods
DESCRIPTIONS = {
    "online_doremi": ("online DoReMi: the main model's own clipped excess over the round-1 "
                      "reference updates its sampling weights each step (resampling)"),
    "online_doremi_reweight": ("online DoReMi, reweighting (the paper's objective on the main "
                               "model): stratified batches, the loss reweighted each step by "
                               "weights its own excess over the round-1 reference updates"),
    "odm": "ODM: an EXP3 bandit over domains with the training loss as reward, no reference",
    "schedule": "a schedule: natural weights, then offline DoReMi's weights",
}


def study_for(study: dict, name: str, doremi_key: str) -> dict:
  """The study with method `name`'s main run as DoReMi's and offline DoReMi as a baseline."""
  mains = dict(study.get("mains", {}))
  offline = mains.pop(doremi_key, None)
  sub = {k: v for k, v in study.items() if k != "methods"}
  sub["mains"] = {doremi_key: study["methods"][name], **mains}
  if offline is not None:
    sub["mains"][OFFLINE] = offline
  return sub


def compute(study: dict, summarize: Callable[[dict], dict], doremi_key: str) -> dict:
  """{method: summary-like dict (baselines, final, downstream, online)} for the report."""
  out = {}
  for name, run in (study.get("methods") or {}).items():
    s = summarize(study_for(study, name, doremi_key))
    out[name] = {
        "description": DESCRIPTIONS.get(name, name),
        "final": s["final"][doremi_key],
        "baselines": s["baselines"],
        "better_than_all_baselines": s["better_than_all_baselines"],
        "downstream": s["downstream"],
        "average_weights": run.get("weights"),
        "online": run.get("online"),
        "setting": run.get("setting"),
        "cost": run.get("cost"),
    }
  return out


def _flags(m: Mapping) -> list[str]:
  """Sentences about what the run measured (each from its numbers)."""
  online = m.get("online") or {}
  since = online.get("reference_beaten_from_step")
  out = []
  cost = m.get("cost")
  if cost:
    out.append(f"Its cost beside a plain main run: the reference's forward each step, "
               f"{cost['reference_forward_fraction']:.1%} of a main step's FLOPs (reference "
               f"{cost['reference_params']:,} parameters, main model {cost['main_params']:,}).")
  if since is not None:
    out.append(f"The main model's mean loss was below the reference's on every domain from "
               f"step {since} to the end, so from there online DoReMi's clipped excess measured "
               f"only per-token noise, not a lag behind the reference (a reference weaker than "
               f"the main model).")
  elif online.get("steps_with_reference_beaten"):
    out.append(f"The main model's mean loss was below the reference's on every domain of the "
               f"batch on {online['steps_with_reference_beaten']} of {online['steps']} steps.")
  return out


def section_md(summary: Mapping, plot: Optional[str], table: Callable,
               verdict_text: Callable) -> Optional[str]:
  """'## Other mixture methods' of report.md; None when the study has none."""
  methods = summary.get("methods") or {}
  if not methods:
    return None
  tol = summary["tolerance"]
  lines = [
      "## Other mixture methods", "",
      "Each method's main run has the same model, steps, batch and seed as the others (equal "
      "training tokens; online DoReMi adds a reference forward each step, its cost below) "
      "and is compared like DoReMi's: difference = method - baseline, with "
      f"`{OFFLINE}` (offline DoReMi's main run) as one more baseline. One seed: provisional.", ""
  ]
  for name, m in methods.items():
    rows = [[
        f"`{b}`",
        verdict_text(c["verdict_average"], c["delta_average"], c["relative_average"], tol),
        verdict_text(c["verdict_worst"], c["delta_worst"], c["relative_worst"], tol),
        f"better on {c['domains_better']}/{c['num_domains']} domains"
    ] for b, c in m["baselines"].items()]
    lines += [
        f"### `{name}`", "",
        m["description"] + (f" ({m['setting']})" if m.get("setting") else "") + ".", ""
    ]
    lines += [table(["against", "average", "worst case", "domains"], rows), ""]
    lines += _flags(m)
    w = m.get("average_weights")
    if w:
      lines += [
          "Mean sampling weights over the run: " + ", ".join(f"{d} {v:.3f}" for d, v in w.items()),
          ""
      ]
  if plot:
    lines.append(f"Weights in force at each step of each method's main run (sampling weights; "
                 f"loss weights for the reweighting method):\n\n"
                 f"![weights in force]({plot})")
  return "\n".join(lines)


def plot_weights_in_force(study: dict, path: str, figure_cls, colors) -> Optional[str]:
  """One panel per method: every domain's weight in force against the step."""
  runs = {n: r.get("trajectory") for n, r in (study.get("methods") or {}).items()}
  runs = {n: t for n, t in runs.items() if t}
  if not runs:
    return None
  domains = list(study["domains"])
  fig = figure_cls(figsize=(6.5, 2.6 * len(runs)))
  c = colors(len(domains))
  for i, (name, rows) in enumerate(runs.items()):
    ax = fig.add_subplot(len(runs), 1, i + 1)
    steps = [r["step"] for r in rows]
    for j, d in enumerate(domains):
      ax.plot(steps, [r["weights"][d] for r in rows], color=c[j], label=d, lw=1.2)
    ax.set_title(name)
    ax.set_ylabel("weight")
    ax.set_ylim(0, max(1e-3, max(max(r["weights"].values()) for r in rows)) * 1.05)
    if i == 0:
      ax.legend(fontsize=7, ncol=min(4, len(domains)))
  ax.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path
