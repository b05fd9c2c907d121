"""The report's downstream section: one-shot exact match of each main model (downstream_eval).

Exact match is in percent, higher is better. For each baseline: DoReMi minus baseline on
the average over tasks and on each task, the tasks where DoReMi is higher, and the steps
DoReMi's main model takes to reach the baseline's final average (the paper's "2.6x
faster", here on this study's tasks). One seed gives provisional numbers; pipeline.seeds
tests the differences over seeds (aggregate.py).
"""
import math
from typing import Optional

from matplotlib.figure import Figure

from doremi_jax import curves

DOREMI = curves.DOREMI
FLOOR = 1.0  # points: below this average exact match, a model is at the floor


def _final(history: list) -> dict:
  last = history[-1]
  return {
      "step": last["step"],
      "tasks": dict(last["tasks"]),
      "average": last["average"],
      "examples": last.get("examples", {})
  }


def _reach(history: list, target: float) -> Optional[float]:
  """First step at which the average exact match is >= target (interpolated)."""
  return curves.steps_to_reach([h["step"] for h in history], [h["average"] for h in history],
                               target, higher_is_better=True)


def _reach_status(history: list, target: float):
  """(status, step): "reached" at a step, "never", or no measurement: "baseline_zero" (any
  model reaches 0) or "one_evaluation" (a curve needs DownstreamConfig.every)."""
  if not target > 0:
    return "baseline_zero", None
  if len(history) < 2:
    return "one_evaluation", None
  reach = _reach(history, target)
  return ("never", None) if reach is None else ("reached", reach)


REACH_TEXT = {
    "baseline_zero": "- (the baseline scored 0)",
    "one_evaluation": "- (one evaluation: set DownstreamConfig.every)",
    "never": "never"
}


def compute(study: dict) -> Optional[dict]:
  """{"tasks", "final": {run: ...}, "baselines": {name: ...}}; None without downstream runs."""
  mains = study.get("mains", {})
  histories = {n: m.get("downstream") for n, m in mains.items() if m.get("downstream")}
  if not histories:
    return None
  finals = {n: _final(h) for n, h in histories.items()}
  tasks = sorted({t for f in finals.values() for t in f["tasks"]})
  total = study.get("equal_compute", {}).get("train_steps")
  out = {
      "tasks": tasks,
      "suite": (study.get("downstream") or {}).get("suite"),
      "final": finals,
      "decimals": decimals(finals, len(tasks)),
      "at_floor": all(f["average"] < FLOOR for f in finals.values()),
      "baselines": {}
  }
  if DOREMI not in finals:
    return out
  doremi = finals[DOREMI]
  for name, base in finals.items():
    if name == DOREMI:
      continue
    status, reach = _reach_status(histories[DOREMI], base["average"])
    out["baselines"][name] = {
        "delta_average":
            doremi["average"] - base["average"],
        "delta_tasks": {
            t: doremi["tasks"][t] - base["tasks"][t]
            for t in tasks
            if t in doremi["tasks"] and t in base["tasks"]
        },
        "tasks_better":
            sum(1 for t in tasks if doremi["tasks"].get(t, -1) > base["tasks"].get(t, math.inf)),
        "num_tasks":
            len(tasks),
        "target_average":
            base["average"],
        "steps_to_reach":
            reach,
        "reach_status":
            status,
        "fraction_of_steps":
            reach / total if reach is not None and total else None,
        "speedup":
            total / reach if reach and total else None
    }
  return out


def one_example(finals: dict, num_tasks: int) -> Optional[float]:
  """Points of the average exact match that one example moves: 100 / (n T) for T tasks of at
  least n examples (None without example counts)."""
  counts = [n for f in finals.values() for n in f.get("examples", {}).values() if n]
  return 100 / (min(counts) * max(num_tasks, 1)) if counts else None


def decimals(finals: dict, num_tasks: int) -> int:
  """Decimals that keep one example visible (400 examples: 0.25 points, 2 decimals)."""
  step = one_example(finals, num_tasks)
  return 1 if step is None else min(3, max(1, math.ceil(-math.log10(step)) + 1))


def pct(x, nd: int = 1, sign: str = "") -> str:
  """Exact match in points with nd decimals ("-" when missing); sign="+" for differences."""
  return f"{x:{sign}.{nd}f}" if x is not None and math.isfinite(x) else "-"


def section_md(study: dict, ds: Optional[dict], plot: Optional[str] = None) -> str:
  """Markdown: the exact-match table, DoReMi against each baseline, and what the tasks are."""
  if not ds:
    return ""
  names, nd = list(ds["final"]), ds.get("decimals", 1)
  lines = ["## Downstream: one-shot exact match (%, higher is better, best in bold)", ""]
  description = (study.get("downstream") or {}).get("description")
  if description:
    lines += [description, ""]
  lines += [
      "| task | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"
  ]
  for task in ds["tasks"] + ["average"]:
    vals = [(ds["final"][n]["average"] if task == "average" else ds["final"][n]["tasks"].get(task))
            for n in names]
    best = max((v for v in vals if v is not None), default=None)
    cells = [f"**{pct(v, nd)}**" if v is not None and v == best else pct(v, nd) for v in vals]
    label = "**average**" if task == "average" else task
    examples = ds["final"][names[0]]["examples"].get(task)
    label += f" ({examples} examples)" if examples else ""
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines += ["", _noise_note(ds)]
  if plot:
    lines += ["", f"![downstream exact match against steps]({plot})"]
  if ds["baselines"]:
    lines += [
        "", "DoReMi minus each baseline (points of exact match; one seed: provisional):", "",
        "| baseline | average | tasks where DoReMi is higher | steps to reach the baseline's "
        "final average |", "|---|---|---|---|"
    ]
    for name, b in ds["baselines"].items():
      reach = REACH_TEXT.get(b["reach_status"])
      if b["reach_status"] == "reached":
        reach = f"{b['steps_to_reach']:.0f}"
        if b["fraction_of_steps"] is not None:
          reach += f" ({b['fraction_of_steps']:.0%} of the steps)"
      lines.append(f"| `{name}` | {pct(b['delta_average'], nd, '+')} | {b['tasks_better']}/"
                   f"{b['num_tasks']} | {reach} |")
  return "\n".join(lines)


def _noise_note(ds: dict) -> str:
  """How large a difference one example makes, and whether every model is at the floor."""
  counts = [n for f in ds["final"].values() for n in f["examples"].values() if n]
  text = ""
  if counts:
    n = min(counts)
    text = (f"One example is {100 / n:.2g} points of a task's exact match at {n} examples; "
            "at p% the binomial standard error is sqrt(p (100 - p) / n) points.")
  if ds.get("at_floor"):
    text += (f" **Every main model is at the floor** (average exact match under {FLOOR:g} "
             "point): at this scale these tasks do not separate the mixtures.")
  return text.strip()


def curves_figure(study: dict) -> Optional[Figure]:
  """Average exact match against steps, one line per main model, each in its own style; the
  axis starts at 0 (a little below, so that a line at 0 shows) and spans at least five
  examples' worth, so that one example out of hundreds does not look like a climb; the lines
  are dodged by under 1% of the steps, so that equal ones stay side by side."""
  mains = {n: m["downstream"] for n, m in study.get("mains", {}).items() if m.get("downstream")}
  if not mains:
    return None
  finals = {n: h[-1] for n, h in mains.items()}
  one = one_example(finals, max(len(f["tasks"]) for f in finals.values())) or 1.0
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  top = 0.0
  steps = [h["step"] for history in mains.values() for h in history]
  dodge = 0.008 * (max(steps) - min(steps))  # equal curves (all at 0) side by side, not hidden
  for j, (name, history) in enumerate(mains.items()):
    values = [h["average"] for h in history]
    top = max([top] + [v for v in values if math.isfinite(v)])
    shift = (j - (len(mains) - 1) / 2) * dodge
    ax.plot([h["step"] + shift for h in history], values, label=name, **curves.line_style(j))
  top = max(1.1 * top, 5 * one)
  ax.set_ylim(-0.03 * top, top)  # a line at 0 stays visible above the axis
  ax.set_xlabel("step")
  ax.set_ylabel("average exact match (%)")
  ax.set_title(f"Downstream one-shot exact match (one example: {one:.2g} points)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return fig


def plot_curves(study: dict, path: str) -> Optional[str]:
  fig = curves_figure(study)
  if fig is None:
    return None
  fig.savefig(path, dpi=100)
  return path
