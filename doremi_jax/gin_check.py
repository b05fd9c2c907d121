"""What gin accepts silently or words in its own terms, checked and worded for the user.

- A macro bound by a --gin flag that no binding of the parsed files uses (`DOMIAN_FIELD`) is
  an error naming it and the nearest macros the files do use (gin itself accepts it).
- An unknown configurable or parameter gets the nearest known names appended.
- The inner-quotes hint goes only with a value that is an unquoted word or path.
- An error raised inside a configurable loses gin's `In call to configurable ...` trailer, and
  names the configurable's parameters by the macros the files bind them to (`data_files` ->
  `DATA_FILES`), the names a user of a pipeline gin file sets.

Reads gin's registry and parsed config (gin.config's module state): the one place that does.
"""
import difflib
import inspect
import re
from typing import Iterable, Optional, Sequence

from gin import config as gin_config

# Macros read by code (gin.query_parameter) rather than referenced by a binding.
CODE_MACROS = ("TOPOLOGY",)
_CALL = re.compile(r"In call to configurable '([^']+)'")


def _macro_name(selector: str) -> str:
  return selector.rsplit("/", 1)[0]


def used_macros() -> set[str]:
  """The macros that the parsed bindings reference (`%NAME`), and those read by code."""
  used = set(CODE_MACROS)
  for ref in gin_config.iterate_references(gin_config._CONFIG):  # pylint: disable=protected-access
    if ref.scoped_selector.endswith("/gin.macro"):
      used.add(_macro_name(ref.scoped_selector))
  return used


def bound_macros() -> dict:
  """{NAME: value} of the macros the parsed files and bindings bind."""
  config = gin_config._CONFIG  # pylint: disable=protected-access
  return {
      scope: params.get("value")
      for (scope, selector), params in config.items()
      if selector == "gin.macro"
  }


def bindings_named(params: Sequence[str]) -> list[tuple[str, object]]:
  """[("scope/configurable.param", value)] of the parsed bindings of these parameters, with
  literal values (macro references left out: their macros are listed)."""
  out = []
  for (scope, selector), bound in gin_config._CONFIG.items():  # pylint: disable=protected-access
    for param, value in bound.items():
      if param in params and not isinstance(value, gin_config.ConfigurableReference):
        out.append((f"{scope + '/' if scope else ''}{selector.rsplit('.', 1)[-1]}.{param}", value))
  return sorted(out)


def nearest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
  """The known names closest to name (case-insensitive), best first."""
  by_lower = {k.lower(): k for k in known}
  return [by_lower[k] for k in difflib.get_close_matches(name.lower(), by_lower, n, 0.6)]


def _suggest(name: str, known: Iterable[str], what: str) -> str:
  known = sorted(set(known))
  close = nearest(name, known)
  if close:
    return f"; nearest {what}: {', '.join(close)}"
  return f"; known {what}: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}"


def binding_key(binding: str) -> str:
  return binding.split("=", 1)[0].strip()


def check_bound_macros(bindings: Sequence[str]) -> None:
  """A --gin macro binding that nothing uses fails, naming the nearest used macros."""
  used = used_macros()
  for binding in bindings:
    key = binding_key(binding)
    if "." in key or "/" in key:
      continue  # a parameter: gin checks it while parsing
    if key not in used:
      raise ValueError(f"--gin.{binding}: no binding of these gin files uses the macro {key}"
                       f"{_suggest(key, used - set(CODE_MACROS), 'macros')}")


def _parameters(selector: str) -> list[str]:
  configurable = gin_config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
  if configurable is None:
    return []
  fn = configurable.wrapped
  if inspect.isclass(fn):
    fn = fn.__init__
  try:
    return [p for p in inspect.signature(fn).parameters if p != "self"]
  except (TypeError, ValueError):
    return []


def _configurables() -> set[str]:
  names = set()
  for selector, _ in gin_config._REGISTRY.items():  # pylint: disable=protected-access
    if not selector.startswith("gin."):
      names.add(selector.rsplit(".", 1)[-1])
  return names


def _needs_quotes(value: str) -> bool:
  """An unquoted word or path, which gin cannot parse as a Python literal."""
  value = value.strip()
  return bool(value) and not re.match(r"""['"\d\[\(\{%@\-+.]|(True|False|None)\b""", value)


def explain(message: str, binding: Optional[str] = None) -> str:
  """gin's first error line, with the nearest known names or the inner-quotes hint."""
  message = message.rstrip(".")
  if binding:  # one binding: gin's line number says nothing
    message = re.sub(r"\.? \(line \d+\)$", "", message)
  param = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
  if param:
    return message + _suggest(param.group(2), _parameters(param.group(1)), "parameters")
  unknown = re.search(r"No configurable matching (?:reference )?'@?([^'(]+)", message)
  if unknown:
    name = unknown.group(1).rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    return message + _suggest(name, _configurables(), "configurables")
  if binding and "=" in binding and _needs_quotes(binding.split("=", 1)[1]):
    key, value = (part.strip() for part in binding.split("=", 1))
    return f"{message}; a string needs inner quotes: --gin.{key}=\"'{value}'\""
  return message


def _macros_of(configurable: str) -> dict[str, str]:
  """{parameter: MACRO} of the unscoped bindings `configurable.parameter = %MACRO`."""
  match = gin_config._REGISTRY.get_match(configurable)  # pylint: disable=protected-access
  if match is None:
    return {}
  params = gin_config._CONFIG.get(("", match.selector), {})  # pylint: disable=protected-access
  out = {}
  for param, value in params.items():
    if (isinstance(value, gin_config.ConfigurableReference) and
        value.scoped_selector.endswith("/gin.macro")):
      out[param] = _macro_name(value.scoped_selector)
  return out


def user_terms(e: BaseException) -> str:
  """The error's text without gin's `In call to configurable` lines; the configurable's
  parameter names (those with an underscore) replaced by the macros bound to them."""
  text = str(e)
  called = _CALL.findall(text)
  lines = [l for l in text.splitlines() if l.strip() and not _CALL.search(l)]
  text = "\n".join(lines) if lines else type(e).__name__
  for configurable in called[:1]:
    for param, macro in _macros_of(configurable).items():
      if "_" in param:
        text = re.sub(rf"(?<![\w/.]){re.escape(param)}(?![\w/])", macro, text)
  return text
