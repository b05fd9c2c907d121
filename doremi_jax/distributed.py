"""JAX's multi-host runtime: jax.distributed.initialize from flags, environment or TPU.

On TPU VM slices JAX finds the coordinator from the TPU environment. Elsewhere (GPU
clusters, several CPU processes on loopback) give --coordinator_address, --num_processes
and --process_id, or the environment variables DOREMI_COORDINATOR_ADDRESS,
DOREMI_NUM_PROCESSES and DOREMI_PROCESS_ID.
"""
import logging
import os

import jax

ENV = {"coordinator_address": "DOREMI_COORDINATOR_ADDRESS",
       "num_processes": "DOREMI_NUM_PROCESSES", "process_id": "DOREMI_PROCESS_ID"}


def add_flags(parser) -> None:
  parser.add_argument("--coordinator_address", default=os.environ.get(ENV["coordinator_address"]),
                      help="host:port of process 0 (multi-process runs off TPU)")
  parser.add_argument("--num_processes", type=int,
                      default=_int_env(ENV["num_processes"]))
  parser.add_argument("--process_id", type=int, default=_int_env(ENV["process_id"]))
  parser.add_argument("--initialization_timeout", type=int, default=120,
                      help="seconds to wait for every process to reach the coordinator")
  parser.add_argument("--multihost_tpu", action="store_true",
                      help="initialize from the TPU environment (set by launch/tpu_run.sh)")


def _int_env(name):
  value = os.environ.get(name)
  return int(value) if value else None


def initialize(*, coordinator_address=None, num_processes=None, process_id=None,
               initialization_timeout: int = 120, tpu: bool = False) -> None:
  """Initializes once; a no-op for single-process runs."""
  if tpu:
    jax.distributed.initialize()
    return
  if not coordinator_address:
    return
  if num_processes is None or process_id is None:
    raise ValueError("--coordinator_address needs --num_processes and --process_id.")
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize(%s, %d processes, id %d)", coordinator_address,
               num_processes, process_id)
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=initialization_timeout)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"could not join the JAX distributed runtime at {coordinator_address} as process "
        f"{process_id}/{num_processes} within {initialization_timeout}s: {e}. Check that "
        f"process 0 is running and the address is reachable.") from e


def initialize_from_flags(args) -> None:
  initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
             process_id=args.process_id, initialization_timeout=args.initialization_timeout,
             tpu=args.multihost_tpu)
