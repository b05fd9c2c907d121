"""File helpers of the token store: local paths and tf.io.gfile schemes (gs://, ram://)
alike, atomic writes, and calls bounded in time for remote stores. Re-exported by
doremi_jax.store."""
import os
import shutil
import threading
import uuid
from typing import Any, Callable, Optional

REMOTE_TIMEOUT_S = 60.0  # one read of a remote store's manifest, or its first shard open


class StoreUnreachableError(OSError):
  """A remote store did not answer in time, or refused access."""


# ------------------------------------------------------------------ bounded


def bounded(fn: Callable[[], Any], timeout_s: Optional[float], what: str):
  """fn() run in a daemon thread; StoreUnreachableError (one line) when it has not returned
  within timeout_s or fails with a filesystem error (gs:// without network or credentials)."""
  if timeout_s is None:
    return fn()
  out = {}

  def run():
    try:
      out["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      out["error"] = e

  thread = threading.Thread(target=run, daemon=True, name="store-bounded")
  thread.start()
  thread.join(timeout_s)
  hint = ("check the network and the credentials (`gcloud auth application-default login`, "
          "or GOOGLE_APPLICATION_CREDENTIALS)")
  if thread.is_alive():
    raise StoreUnreachableError(f"{what} did not answer within {timeout_s:g}s: {hint}.")
  error = out.get("error")
  if error is None:
    return out.get("value")
  if type(error).__module__.startswith("tensorflow"):  # tf.errors: multi-line HTTP details
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise StoreUnreachableError(f"{what} failed ({first.strip()}): {hint}.") from error
  raise error


# ------------------------------------------------------------------- files


def is_remote(path: str) -> bool:
  return "://" in path


def gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def open_file(path: str, mode: str = "rb"):
  """Builtin open for local paths, tf.io.gfile for the others."""
  return gfile().GFile(path, mode) if is_remote(path) else open(path, mode)


def exists(path: str) -> bool:
  return gfile().exists(path) if is_remote(path) else os.path.exists(path)


def file_size(path: str) -> int:
  return int(gfile().stat(path).length) if is_remote(path) else os.path.getsize(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def remove_tree(path: str) -> None:
  if not exists(path):
    return
  if is_remote(path):
    gfile().rmtree(path)
  else:
    shutil.rmtree(path, ignore_errors=True)


def tmp_name(path: str) -> str:
  """A unique temporary name next to `path` that does not start with it: ram:// (TF's
  RamFileSystem) says a path exists when any file name starts with it."""
  return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")


def write_atomic(path: str, data: bytes) -> None:
  """Writes a temp file next to `path`, then renames it onto `path`."""
  tmp = tmp_name(path)
  with open_file(tmp, "wb") as f:
    f.write(data)
  if is_remote(path):
    gfile().rename(tmp, path, overwrite=True)
  else:
    os.replace(tmp, path)
