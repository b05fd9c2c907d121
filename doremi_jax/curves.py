"""Metric curves against training steps, shared by the report's sections."""
import math

DOREMI = "doremi"  # the main run trained on DoReMi's weights


def num(x) -> float:
  """float(x), or NaN for None and anything non-numeric."""
  try:
    return float(x)
  except (TypeError, ValueError):
    return float("nan")


def steps_to_reach(steps, values, target, *, higher_is_better: bool = False):
  """First step at which values reach target (<= it; >= it when higher is better), linearly
  interpolated between points; None if never."""
  sign = -1.0 if higher_is_better else 1.0
  target = sign * num(target)
  if not math.isfinite(target):
    return None
  prev = None
  for s, v in zip(steps, values):
    s, v = num(s), sign * num(v)
    if not math.isfinite(v):
      prev = None
      continue
    if v <= target:
      if prev is None or prev[1] == v:
        return s
      s0, v0 = prev
      return s0 + (v0 - target) / (v0 - v) * (s - s0)
    prev = (s, v)
  return None


_DASHES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def line_style(j: int) -> dict:
  """Matplotlib style of the j-th line of a plot: its own dash, marker and marker size, so
  that a line drawn on top of an identical one leaves it visible."""
  return {
      "linestyle": _DASHES[j % len(_DASHES)],
      "marker": _MARKERS[j % len(_MARKERS)],
      "markersize": 8 - 1.5 * (j % 4),
      "linewidth": 2.6 - 0.4 * (j % 4),
      "alpha": 0.9
  }


def baseline_of(names) -> str | None:
  """The run the report's difference plots subtract: `natural` when there is one, else the
  first run that is not DoReMi's (None when there is none)."""
  others = [n for n in names if n != DOREMI]
  return "natural" if "natural" in others else (others[0] if others else None)
