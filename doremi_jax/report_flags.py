"""The warnings of a study's summary (report.py), one short sentence each, computed from its
numbers: the report's "At a glance" list and the console's closing lines print the same."""
from doremi_jax import report_downstream


def flags(s):
  """The warnings of a summary, one short sentence each: the report's "At a glance" list
  and the console's closing lines print the same ones."""
  out = []
  methods = s.get("methods") or {}
  diverged = [n for n, f in s["final"].items() if f["diverged"]]
  diverged += [n for n, m in methods.items() if m["final"]["diverged"]]
  if diverged:
    out.append(f"diverged (NaN log-perplexity): {', '.join(diverged)}")
  d = s.get("diagnostics") or {}
  if "settled" in d and not d["settled"]:
    out.append(f"weights not settled: the last round's half averages differ by "
               f"{d['half_drift']:.4f} > {d['threshold']:.4f}; train the proxy longer")
  if s["num_rounds"] > 1 and not s["converged"]:
    out.append(f"iterated DoReMi did not converge in {s['num_rounds']} rounds "
               f"(last max |avg - ref| = {s['max_abs_change']:.4g})")
  ds = s.get("downstream") or {}
  if ds.get("at_floor"):
    out.append(f"every main model is at the downstream floor (average exact match under "
               f"{report_downstream.FLOOR:g} point): these tasks do not separate the mixtures")
  for name, m in methods.items():
    since = (m.get("online") or {}).get("reference_beaten_from_step")
    if since is not None:
      out.append(f"{name}: the main model's loss was below the reference's on every domain "
                 f"from step {since} on, so its excess no longer measured a lag behind the "
                 f"reference (a reference weaker than the main model)")
  if s["baselines"] and not s["better_than_all_baselines"]:
    out.append("DoReMi did not beat every baseline on both average and worst case: " +
               ", ".join(n for n, _ in flagged_baselines(s)))
  return out


def flagged_baselines(s):
  return [(n, b)
          for n, b in s["baselines"].items()
          if not (b["verdict_average"] == "better" and b["verdict_worst"] == "better")]


def glance_md(s):
  items = flags(s)
  return "\n".join(["**At a glance:**", ""] + [f"- {f}" for f in items]) if items else ""
