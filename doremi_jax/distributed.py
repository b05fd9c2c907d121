"""JAX's multi-host runtime: jax.distributed.initialize from flags, environment or TPU.

On TPU VM slices JAX finds the coordinator from the TPU environment. Elsewhere (GPU
clusters, several CPU processes on loopback) give --coordinator_address, --num_processes
and --process_id, or the environment variables DOREMI_COORDINATOR_ADDRESS,
DOREMI_NUM_PROCESSES and DOREMI_PROCESS_ID.

Failure detection is bounded: JAX's coordination service declares a process dead when it
has sent no heartbeat for --heartbeat_timeout seconds and then stops every other process
with an error (JAX's default is 100 s); a process that finishes waits at most
--shutdown_timeout seconds for the others at exit (JAX's default is 300 s). Joining waits
at most --initialization_timeout seconds for the coordinator.
"""
import logging
import os
import socket
import time

import jax

ENV = {
    "coordinator_address": "DOREMI_COORDINATOR_ADDRESS",
    "num_processes": "DOREMI_NUM_PROCESSES",
    "process_id": "DOREMI_PROCESS_ID",
    "heartbeat_timeout": "DOREMI_HEARTBEAT_TIMEOUT",
    "shutdown_timeout": "DOREMI_SHUTDOWN_TIMEOUT"
}
HEARTBEAT_TIMEOUT = 60
SHUTDOWN_TIMEOUT = 60


def add_flags(parser) -> None:
  parser.add_argument("--coordinator_address", default=os.environ.get(ENV["coordinator_address"]),
                      help="host:port of process 0 (multi-process runs off TPU)")
  parser.add_argument("--num_processes", type=int, default=_int_env(ENV["num_processes"]))
  parser.add_argument("--process_id", type=int, default=_int_env(ENV["process_id"]))
  parser.add_argument("--initialization_timeout", type=int, default=120,
                      help="seconds to wait for every process to reach the coordinator")
  parser.add_argument(
      "--heartbeat_timeout", type=int, default=_int_env(ENV["heartbeat_timeout"]) or
      HEARTBEAT_TIMEOUT, help="seconds without heartbeats after which a process is declared "
      "dead and the others stop with an error")
  parser.add_argument("--shutdown_timeout", type=int, default=_int_env(ENV["shutdown_timeout"]) or
                      SHUTDOWN_TIMEOUT,
                      help="seconds a finishing process waits for the others at exit")
  parser.add_argument("--multihost_tpu", action="store_true",
                      help="initialize from the TPU environment (set by launch/tpu_run.sh)")


def _int_env(name):
  value = os.environ.get(name)
  return int(value) if value else None


def initialize(*, coordinator_address=None, num_processes=None, process_id=None,
               initialization_timeout: int = 120, heartbeat_timeout: int = HEARTBEAT_TIMEOUT,
               shutdown_timeout: int = SHUTDOWN_TIMEOUT, tpu: bool = False) -> None:
  """Initializes once; a no-op for single-process runs."""
  for name, value in (("initialization_timeout", initialization_timeout),
                      ("heartbeat_timeout", heartbeat_timeout), ("shutdown_timeout",
                                                                 shutdown_timeout)):
    if value is None or value <= 0:
      raise ValueError(f"--{name}={value}: must be a positive number of seconds.")
  timeouts = {
      "heartbeat_timeout_seconds": heartbeat_timeout,
      "shutdown_timeout_seconds": shutdown_timeout
  }
  if tpu:
    jax.distributed.initialize(**timeouts)
    return
  if not coordinator_address:
    return
  if num_processes is None or process_id is None:
    raise ValueError("--coordinator_address needs --num_processes and --process_id.")
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if process_id != 0:
    # JAX's client aborts the process (no Python exception) when it cannot register in
    # time; check first that the coordinator accepts connections, with a clear error.
    wait_for_coordinator(coordinator_address, initialization_timeout)
  logging.info(
      "jax.distributed.initialize(%s, %d processes, id %d; timeouts: init %ds, "
      "heartbeat %ds, shutdown %ds)", coordinator_address, num_processes, process_id,
      initialization_timeout, heartbeat_timeout, shutdown_timeout)
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=initialization_timeout,
                               **timeouts)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"could not join the JAX distributed runtime at {coordinator_address} as process "
        f"{process_id}/{num_processes} within {initialization_timeout}s: {e}. Check that "
        f"process 0 is running and the address is reachable.") from e


def wait_for_coordinator(address: str, timeout: float) -> None:
  """Waits until host:port accepts TCP connections; RuntimeError after `timeout` seconds."""
  host, sep, port = address.rpartition(":")
  if not sep or not port.isdigit():
    raise ValueError(f"--coordinator_address={address!r}: give host:port.")
  host = host.strip("[]") or "localhost"
  deadline = time.monotonic() + timeout
  error = None
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(2.0, timeout)):
        return
    except OSError as e:
      error = e
    if time.monotonic() >= deadline:
      break
    time.sleep(0.5)
  raise RuntimeError(
      f"could not reach the JAX coordinator at {address} within {timeout}s ({error}). Check "
      f"that process 0 is running, that --coordinator_address (or "
      f"{ENV['coordinator_address']}) names its host and port, and that the port is open.")


def initialize_from_flags(args) -> None:
  """initialize() from parsed flags; a failure to join exits with its message."""
  try:
    _initialize_from_flags(args)
  except (ValueError, RuntimeError) as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None


def _initialize_from_flags(args) -> None:
  initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
             process_id=args.process_id, initialization_timeout=args.initialization_timeout,
             heartbeat_timeout=args.heartbeat_timeout, shutdown_timeout=args.shutdown_timeout,
             tpu=args.multihost_tpu)
