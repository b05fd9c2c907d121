"""The report's convergence section: have DoReMi's weights settled? (diagnostics.py)."""
import numpy as np

from doremi_jax import diagnostics


def section_md(study: dict, summary: dict, plot: str = None) -> str:
  """Markdown for the last DoReMi round's diagnostics (empty without a trajectory)."""
  d = summary.get("diagnostics")
  if not d or "half_drift" not in d:
    return ""
  k = len(summary["domains"])
  flag = ("The weights **settled**" if d["settled"] else "**Weights not settled**")
  lines = [
      "## Have the weights settled?",
      "",
      f"{flag}: the averages of the first and second half of the last DoReMi round differ by "
      f"at most {d['half_drift']:.4f} (threshold {d['threshold']:.4f} = 0.1 / K, a tenth of a "
      f"uniform domain's weight; `doremi_jax/diagnostics.py`). The paper's weights settle "
      "after about a quarter of the run (Appendix B).",
      "",
      "| diagnostic | value |",
      "|---|---|",
      f"| max \\|first-half avg - second-half avg\\| | {d['half_drift']:.4f} |",
      f"| max \\|full avg - avg over the last 3/4\\| | {d['tail_drift']:.4f} |",
      f"| effective number of domains in the tail, exp(entropy) (of {k}) | "
      f"{d['effective_domains']:.2f} |",
      f"| leader changes in the tail | {d['leader_changes']} |",
  ]
  excess, gap = d.get("tail_excess"), d.get("tail_loss_gap")
  if excess and gap:
    lines += [
        "", "Tail means per domain (last half of the proxy run): the clipped excess "
        f"DoReMi weights by, and the proxy's loss minus the reference's ({gap_sentence(gap)}).", "",
        "| domain | mean excess | proxy - reference loss |", "|---|---|---|"
    ]
    lines += [
        f"| {dom} | {excess.get(dom, float('nan')):.4f} | {gap.get(dom, float('nan')):+.4f} |"
        for dom in summary["domains"]
    ]
  if plot:
    lines += [
        "", "Moving average of the current weights (window: a tenth of the run), as in "
        f"the paper's Fig. 8:", "", f"![moving average of the weights]({plot})"
    ]
  return "\n".join(lines)


def gap_sentence(gap: dict) -> str:
  """What the signs of the proxy-minus-reference tail losses say, from the numbers."""
  finite = {d: g for d, g in gap.items() if g is not None and np.isfinite(g)}
  above = sorted(d for d, g in finite.items() if g > 0)
  below = sorted(d for d, g in finite.items() if g < 0)
  if finite and len(above) == len(finite):
    return "positive on every domain: the proxy has not caught up with its reference"
  if finite and len(below) == len(finite):
    return "negative on every domain: the proxy's loss is below its reference's everywhere"
  parts = []
  if above:
    parts.append(f"positive on {len(above)} of {len(finite)} domains ({', '.join(above)}: the "
                 "proxy has not caught up there)")
  if below:
    parts.append(f"negative on {', '.join(below)} (the proxy is below its reference there)")
  return "; ".join(parts) or "no finite values"


def plot_moving_average(study: dict, domains, path: str, figure_cls, colors):
  """The last round's weights, moving average over a tenth of the run (Fig. 8 style)."""
  rounds = [r for r in study.get("rounds", []) if (r.get("trajectory") or {}).get("domain_weights")]
  if not rounds:
    return None
  t = rounds[-1]["trajectory"]
  alpha = np.asarray(t["domain_weights"], float)
  steps = t.get("steps") or list(range(1, len(alpha) + 1))
  smooth = diagnostics.moving_average(alpha, max(1, len(alpha) // 10))
  fig = figure_cls(figsize=(8.0, 4.5))
  ax = fig.subplots()
  for i, (d, c) in enumerate(zip(domains, colors(len(domains)))):
    ax.plot(steps, smooth[:, i], color=c, lw=1.8, label=d)
  ax.set_xlabel("proxy step")
  ax.set_ylabel("domain weight (moving average)")
  ax.grid(alpha=0.3)
  ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path
