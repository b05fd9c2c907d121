"""The command-line edge: flags, gin files and bindings, distributed start, clean errors."""
import argparse
import logging
import os
import sys

import gin
import jax

from doremi_jax import distributed
from doremi_jax import gin_check
from doremi_jax import outputs
from doremi_jax import quiet

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def gin_dir() -> str:
  """The gin files: the installed package's copy, or the repository's gin/ in a checkout."""
  installed = os.path.join(PACKAGE_DIR, "gin")
  if os.path.isdir(installed):
    return installed
  return os.path.join(os.path.dirname(PACKAGE_DIR), "gin")


def default_gin_search_paths() -> tuple[str, ...]:
  """Where --gin_file and `include` look after --gin_search_paths: the shipped gin files
  (`runs/doremi.gin`, also as `gin/runs/doremi.gin`), then the working directory."""
  gin_files = gin_dir()
  return (gin_files, os.path.dirname(gin_files), os.getcwd())


def write_operative_config(model_dir: str) -> None:
  outputs.write_text(os.path.join(model_dir, outputs.CONFIG), gin.operative_config_str())


_EPILOG = """gin:
  --gin_file=FILE         a gin file (repeatable), e.g. pipelines/demo_cpu.gin
  --gin.NAME=VALUE        binds a macro or a parameter after the files; strings need inner
                          quotes: --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=300
                          --gin.main/train.eval_every=50 (a stage's scope: reference/, proxy/,
                          main/)
  --help with --gin_file lists the macros those files bind, with their values.
The console scripts doremi-train, doremi-evaluate, doremi-pipeline, doremi-compile-check
run the same as `python -m doremi_jax.train` (and so on)."""


def parse_flags(argv, extra=None, description=None):
  parser = argparse.ArgumentParser(description=description, epilog=_EPILOG, add_help=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("-h", "--help", action="store_true",
                      help="show this help (and the macros of the --gin_file files) and exit")
  parser.add_argument(
      "--gin_file", action="append", default=[],
      help="gin file (repeatable); searched in --gin_search_paths, then in "
      "the shipped gin files (e.g. runs/doremi.gin)")
  parser.add_argument("--gin_search_paths", default="",
                      help="comma-separated directories to look for gin files in")
  parser.add_argument(quiet.VERBOSE_FLAG, action="store_true",
                      help="show every log line and warning, the libraries' too")
  distributed.add_flags(parser)
  if extra:
    extra(parser)
  args, rest = parser.parse_known_args(argv)
  if args.help:
    print(parser.format_help() + _macros_help(args.gin_file, args.gin_search_paths))
    raise SystemExit(0)
  bindings = []
  for arg in rest:
    if not arg.startswith("--gin."):
      parser.error(f"unknown flag {arg!r}; gin bindings are --gin.NAME=VALUE")
    bindings.append(arg[len("--gin."):])
  return args, bindings


def _macros_help(gin_files, search_paths: str) -> str:
  """For --help: the macros that gin_files bind and use (NAME = value), and their bindings of
  steps (a study's stages: shorten it with these). Empty without files."""
  if not gin_files:
    return ""
  try:
    parse_gin(gin_files, [], search_paths)
    used = gin_check.used_macros()
    macros = {n: v for n, v in gin_check.bound_macros().items() if n in used}
    steps = gin_check.bindings_named(("train_steps", "main_steps"))
  finally:
    gin.clear_config()
  width = max((len(n) for n in macros), default=0)
  lines = [f"\nmacros of {', '.join(gin_files)} (override with --gin.NAME=VALUE):"]
  lines += [f"  --gin.{n.ljust(width)} = {v!r}" for n, v in sorted(macros.items())]
  if steps:
    lines += ["steps bound by these files (set smaller ones to shorten a run or study):"]
    lines += [f"  --gin.{k}={v!r}" for k, v in steps]
  return "\n".join(lines)


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def parse_gin(gin_files, bindings, search_paths: str = "") -> None:
  """Parses gin files and bindings; a bad one fails here, in one message, before compute."""
  for path in [p for p in search_paths.split(",") if p] + list(default_gin_search_paths()):
    gin.add_config_file_search_path(path)
  if not gin_files:
    raise SystemExit("error: give at least one --gin_file (for example runs/reference.gin)")
  # Any error while parsing is a configuration error: gin raises ValueError, KeyError,
  # SyntaxError, tokenize.TokenError, ImportError or IOError.
  for name in gin_files:
    try:
      gin.parse_config_file(name)
    except Exception as e:  # pylint: disable=broad-except
      raise SystemExit(f"error: gin file {name}: {gin_check.explain(_first_line(e))}") from None
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:  # pylint: disable=broad-except
      raise SystemExit(
          f"error: --gin.{binding}: {gin_check.explain(_first_line(e), binding)}") from None
  try:
    gin_check.check_bound_macros(bindings)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


def quiet_logging() -> None:
  """The run's logging: quiet.py's filter, or everything with --verbose."""
  quiet.quiet_logging(show_all=quiet.verbose())


def run_main(fn, argv=None, extra=None):
  """Entry point shared by train/evaluate/pipeline: flags, distributed init, gin, fn()."""
  args, bindings = parse_flags(sys.argv[1:] if argv is None else argv, extra,
                               description=sys.modules[fn.__module__].__doc__)
  quiet.quiet_logging(show_all=args.verbose or quiet.verbose())
  distributed.initialize_from_flags(args)
  with quiet.filtered_native_stderr():  # the backends' start-up probes
    jax.devices()
  parse_gin(args.gin_file, bindings, args.gin_search_paths)
  try:
    return fn(args) if extra else fn()
  except (ValueError, FileNotFoundError, FloatingPointError, outputs.OutputError) as e:
    raise SystemExit(f"error: {gin_check.user_terms(e)}") from None
  except Exception as e:  # pylint: disable=broad-except
    if outputs.is_io_error(e):  # a write or read that failed outside outputs' helpers
      logging.debug("I/O error", exc_info=True)
      raise SystemExit(f"error: {outputs.first_line(e)}. Check space and access there, then "
                       f"rerun the same command: the run resumes from its last complete "
                       f"checkpoint.") from None
    # gin: a configurable called without its required bindings
    if not isinstance(e, RuntimeError) or "Required bindings" not in str(e):
      raise
    raise SystemExit(f"error: {_first_line(e)} (check the --gin_file list: e.g. "
                     f"runs/reference.gin for doremi-train, runs/eval.gin for "
                     f"doremi-evaluate)") from None
