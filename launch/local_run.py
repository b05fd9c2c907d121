r"""Runs N JAX processes on this machine over loopback, as one multi-host job.

  python launch/local_run.py --num_processes=2 --devices_per_process=4 -- \
      -m doremi_jax.train --gin_file=gin/runs/reference.gin --gin.MODEL_DIR="'/tmp/r'" ...

Everything after `--` is the command line of each process's Python interpreter. Each
process gets JAX_PLATFORMS=cpu, XLA_FLAGS with
--xla_force_host_platform_device_count=<devices_per_process>, and the DOREMI_COORDINATOR_ADDRESS,
DOREMI_NUM_PROCESSES and DOREMI_PROCESS_ID variables that doremi_jax.distributed reads
(process 0 hosts JAX's coordination service on a free loopback port). CPU collectives go
over gloo. Output lines are prefixed with "[pN] ".

If a process exits with a non-zero status (or is killed), the launcher gives the others
--grace_seconds to stop by themselves (JAX's coordination service notices a dead peer by
its missing heartbeats; see --heartbeat_timeout in doremi_jax.distributed), then
terminates them, and exits non-zero naming the process that failed first. SIGINT/SIGTERM
to the launcher are forwarded to every process.
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that is free now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(base: dict, *, process_id: int, num_processes: int, devices: int,
                coordinator: str) -> dict:
  """The environment of one process: CPU platform, device count, coordinator and ids."""
  env = dict(base)
  xla_flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["DOREMI_COORDINATOR_ADDRESS"] = coordinator
  env["DOREMI_NUM_PROCESSES"] = str(num_processes)
  env["DOREMI_PROCESS_ID"] = str(process_id)
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _pump(stream, out, prefix: str, lock: threading.Lock) -> None:
  for line in iter(stream.readline, b""):
    text = line.decode("utf-8", errors="replace")
    with lock:
      out.write(prefix + text if text.endswith("\n") else prefix + text + "\n")
      out.flush()
  stream.close()


def _describe(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"was killed by signal {-returncode}"
  return f"exited with status {returncode}"


def _signal_all(procs, sig) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass


def run(argv, *, num_processes: int, devices_per_process: int, grace_seconds: float = 10.0,
        host: str = "127.0.0.1", port: int = 0, python: str = sys.executable, cwd=None) -> int:
  """Starts the processes, streams their output, and returns the job's exit status."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError("--num_processes and --devices_per_process must be >= 1.")
  coordinator = f"{host}:{port or free_port(host)}"
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(num_processes):
    env = process_env(os.environ, process_id=i, num_processes=num_processes,
                      devices=devices_per_process, coordinator=coordinator)
    # Each process leads its own process group, so that terminating it also ends anything
    # it started (and a signal to the launcher's group does not reach it twice).
    p = subprocess.Popen([python, *argv], env=env, cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    procs.append(p)
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(stream, out, f"[p{i}] ", lock), daemon=True)
      t.start()
      pumps.append(t)
  with lock:
    print(
        f"local_run: started {num_processes} processes x {devices_per_process} CPU devices, "
        f"coordinator {coordinator}", file=sys.stderr, flush=True)

  forwarded = []

  def forward(signum, frame):
    del frame
    forwarded.append(signum)
    _signal_all(procs, signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    failed = None
    while True:
      codes = [p.poll() for p in procs]
      if failed is None:
        for i, code in enumerate(codes):
          if code not in (None, 0):
            failed = (i, code, time.monotonic())
            with lock:
              print(
                  f"local_run: process {i} {_describe(code)}; stopping the others "
                  f"(grace {grace_seconds:g}s).", file=sys.stderr, flush=True)
            break
      if all(c is not None for c in codes):
        break
      if failed is not None and time.monotonic() - failed[2] > grace_seconds:
        _signal_all(procs, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
          time.sleep(0.1)
        _signal_all(procs, signal.SIGKILL)
        for p in procs:
          p.wait()
        break
      time.sleep(0.1)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for t in pumps:
    t.join(timeout=5.0)
  if failed is not None:
    i, code, _ = failed
    with lock:
      print(f"local_run: FAILED: process {i} of {num_processes} {_describe(code)}.",
            file=sys.stderr, flush=True)
    return code if code > 0 else 128 - code
  if forwarded:
    return 128 + forwarded[0]
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--" in argv:
    split = argv.index("--")
    own, child = argv[:split], argv[split + 1:]
  else:
    own, child = argv, []
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument(
      "--grace_seconds", type=float, default=10.0,
      help="after a process fails, how long the others may take to stop "
      "on their own before they are terminated")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--python", default=sys.executable, help="interpreter to run")
  args = parser.parse_args(own)
  if not child:
    parser.error("give the process command line after `--` (for example "
                 "`-- -m doremi_jax.train --gin_file=...`)")
  return run(child, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
             grace_seconds=args.grace_seconds, port=args.port, python=args.python)


if __name__ == "__main__":
  sys.exit(main())
