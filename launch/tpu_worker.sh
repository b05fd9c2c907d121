#!/usr/bin/env bash
# The worker side of launch/tpu_run.sh. It runs on every TPU VM worker of a slice: tpu_run.sh
# ships it inline in each `gcloud ... ssh --command` (gzip + base64), so the workers always run
# the launcher's own copy, whatever code is installed there.
#
#   tpu_worker.sh preflight                 a live run? else stop stale TPU users, clear the lock
#   tpu_worker.sh start RUN GS_LOG_DIR CMD  start CMD detached (setsid nohup), once per RUN
#   tpu_worker.sh watch RUN OFFSETS         the run's log from line OFFSETS[worker] until it ends
#   tpu_worker.sh status                    one status line for the current run
#   tpu_worker.sh logs RUN LINES FOLLOW     the last LINES lines of the log (and follow: 1)
#   tpu_worker.sh kill GRACE                stop the run (SIGTERM, SIGKILL after GRACE s), then
#                                           every other TPU user, and clear the libtpu lock
#
# Log lines go out as "[wN] line"; lines for the launcher start with "@@DOREMI". A command is
# safe to run twice (gcloud re-runs it on a worker whose ssh connection dropped): `start`
# starts RUN at most once.
#
# Runs live in ~/doremi_runs/RUN/ (cmd.sh, run.sh, pid, log, exit_code); ~/doremi_runs/current
# points at the latest. Test hooks: DOREMI_WORKER_ID, DOREMI_TPU_DEVICES, DOREMI_LIBTPU_LOCKFILE,
# DOREMI_LOG_SYNC_SECS.
set -uo pipefail
shopt -s nullglob

readonly RUNS_DIR="${HOME}/doremi_runs"
readonly LOCKFILE="${DOREMI_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}"

# This worker's index in the slice (0 is the coordinator), from the TPU VM metadata.
worker_id() {
  if [[ -n "${DOREMI_WORKER_ID:-}" ]]; then
    echo "${DOREMI_WORKER_ID}"
    return
  fi
  local id
  id="$(curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null)"
  if [[ "${id}" =~ ^[0-9]+$ ]]; then echo "${id}"; else hostname; fi
}
W="$(worker_id)"
readonly W

SUDO=""
if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
fi

say() { echo "[w${W}] $*"; }

# The run directory for RUN ('' or 'current': the latest).
run_dir() {
  local run="${1:-current}"
  if [[ "${run}" == current ]]; then
    readlink -f "${RUNS_DIR}/current" 2>/dev/null || true
  else
    echo "${RUNS_DIR}/${run}"
  fi
}

run_pid() { cat "$1/pid" 2>/dev/null || true; }

# Whether the run in directory $1 is still running.
run_alive() {
  local pid
  pid="$(run_pid "$1")"
  [[ -n "${pid}" && ! -f "$1/exit_code" ]] && kill -0 "${pid}" 2>/dev/null
}

# PIDs of the processes that hold a TPU device open (other than this script).
tpu_users() {
  local devs=()
  if [[ -n "${DOREMI_TPU_DEVICES:-}" ]]; then
    read -r -a devs <<<"${DOREMI_TPU_DEVICES}"
  else
    devs=(/dev/accel* /dev/vfio/*)
  fi
  [[ ${#devs[@]} -gt 0 ]] || return 0
  {
    if command -v lsof >/dev/null 2>&1; then
      ${SUDO} lsof -t -w "${devs[@]}" 2>/dev/null
    else
      ${SUDO} fuser "${devs[@]}" 2>/dev/null | tr ' ' '\n'
    fi
  } | grep -E '^[0-9]+$' | grep -vx "$$" | sort -u
}

# Whether a PID (or a process group: -PGID) is still running (zombies are not).
running() {
  local col=pid id="$1"
  if [[ "${id}" == -* ]]; then
    col=pgid
    id="${id#-}"
  fi
  ps -e -o "${col}=,stat=" 2>/dev/null \
    | awk -v id="${id}" '$1 == id && $2 !~ /^Z/ { found = 1 } END { exit !found }'

}

# Sends SIGTERM to the given PIDs (or process groups: -PGID), waits up to $1 seconds, then
# sends SIGKILL to what is left.
terminate() {
  local grace="$1" waited=0 p alive
  shift
  [[ $# -gt 0 ]] || return 0
  ${SUDO} kill -TERM -- "$@" 2>/dev/null
  while ((waited < grace * 10)); do
    alive=0
    for p in "$@"; do running "${p}" && alive=1; done
    ((alive)) || return 0
    sleep 0.1
    waited=$((waited + 1))
  done
  ${SUDO} kill -KILL -- "$@" 2>/dev/null
  sleep 1
}

# Stops every process that holds the TPU and removes the libtpu lock file.
clear_tpu() {
  local grace="$1" pids p
  mapfile -t pids < <(tpu_users)
  for p in ${pids[@]+"${pids[@]}"}; do
    say "stopping process ${p} that holds the TPU: $(ps -o args= -p "${p}" 2>/dev/null | cut -c1-120)"
  done
  terminate "${grace}" ${pids[@]+"${pids[@]}"}
  if [[ -e "${LOCKFILE}" ]]; then
    ${SUDO} rm -f "${LOCKFILE}" && say "removed ${LOCKFILE}"
  fi
  echo "@@DOREMI_CLEAN worker=${W} stopped=${#pids[@]}"
}

cmd_preflight() {
  local dir
  dir="$(run_dir current)"
  if [[ -n "${dir}" ]] && run_alive "${dir}"; then
    echo "@@DOREMI_ALIVE worker=${W} run=$(basename "${dir}") pid=$(run_pid "${dir}")"
    return 0
  fi
  clear_tpu 30
}

# run.sh: the detached wrapper. It records its PID (it leads its own session and process
# group), runs cmd.sh with the output in `log`, copies the log to GS_LOG_DIR now and then, and
# records cmd.sh's exit status in `exit_code`.
write_wrapper() {
  cat >"$1/run.sh" <<'EOF'
#!/usr/bin/env bash
dir="$1"; gs="$2"; w="$3"
echo $$ >"${dir}/pid"
copy_log() {
  [[ -n "${gs}" ]] || return 0
  if command -v gcloud >/dev/null 2>&1; then
    gcloud storage cp "${dir}/log" "${gs}/worker-${w}.log" >/dev/null 2>&1
  elif command -v gsutil >/dev/null 2>&1; then
    gsutil -q cp "${dir}/log" "${gs}/worker-${w}.log" >/dev/null 2>&1
  fi
}
# A stop request (tpu_worker.sh kill signals the whole group) reaches cmd.sh too; wait for it.
trap ':' TERM INT HUP
bash "${dir}/cmd.sh" >>"${dir}/log" 2>&1 </dev/null &
child=$!
if [[ -n "${gs}" ]]; then
  (while sleep "${DOREMI_LOG_SYNC_SECS:-60}"; do copy_log; done) &
  syncer=$!
fi
while :; do
  wait "${child}"
  rc=$?
  kill -0 "${child}" 2>/dev/null || break
done
[[ -n "${syncer:-}" ]] && kill "${syncer}" 2>/dev/null
echo "${rc}" >"${dir}/exit_code.tmp" && mv "${dir}/exit_code.tmp" "${dir}/exit_code"
copy_log
exit "${rc}"
EOF
}

cmd_start() {
  local run="$1" gs="$2" cmd="$3" dir pid i
  dir="$(run_dir "${run}")"
  mkdir -p "${RUNS_DIR}"
  if ! mkdir "${dir}" 2>/dev/null; then
    # gcloud re-runs a command after a dropped connection: never start a run twice.
    say "run ${run} was already started here"
    echo "@@DOREMI_STARTED worker=${W} run=${run} pid=$(run_pid "${dir}") again=1"
    return 0
  fi
  printf '%s\n' "${cmd}" >"${dir}/cmd.sh"
  : >"${dir}/log"
  write_wrapper "${dir}"
  ln -sfn "${dir}" "${RUNS_DIR}/current"
  setsid nohup bash "${dir}/run.sh" "${dir}" "${gs}" "${W}" >/dev/null 2>&1 </dev/null &
  for ((i = 0; i < 50; i++)); do
    [[ -s "${dir}/pid" ]] && break
    sleep 0.1
  done
  pid="$(run_pid "${dir}")"
  say "started run ${run} (pid ${pid:-?}), log ${dir}/log"
  echo "@@DOREMI_STARTED worker=${W} run=${run} pid=${pid}"
}

# Whether the log says the trainer stopped for a preemption (it then exits with status 0).
preempted() {
  grep -qE 'preempted: checkpoint saved at step|\] preempted at step' "$1/log" 2>/dev/null \
    && echo 1 || echo 0
}

cmd_watch() {
  local run="$1" offsets="$2" dir pid off=0 item rc i
  for item in ${offsets//,/ }; do
    [[ "${item%%:*}" == "${W}" ]] && off="${item#*:}"
  done
  dir="$(run_dir "${run}")"
  for ((i = 0; i < 100; i++)); do
    [[ -s "${dir}/pid" ]] && break
    sleep 0.1
  done
  pid="$(run_pid "${dir}")"
  if [[ -z "${pid}" ]]; then
    say "no run ${run} on this worker"
    echo "@@DOREMI_EXIT worker=${W} rc=255 missing=1 preempted=0"
    return 0
  fi
  # tail stops once the wrapper has exited and the log is read to the end.
  tail -n "+$((off + 1))" -s 1 -F --pid="${pid}" "${dir}/log" 2>/dev/null | sed -u "s/^/[w${W}] /"
  for ((i = 0; i < 50; i++)); do
    [[ -f "${dir}/exit_code" ]] && break
    sleep 0.1
  done
  rc="$(cat "${dir}/exit_code" 2>/dev/null || echo 137)"  # none: it was killed
  echo "@@DOREMI_EXIT worker=${W} rc=${rc} preempted=$(preempted "${dir}")"
}

cmd_status() {
  local dir state=none rc="" step="" age="" run="-" holders
  dir="$(run_dir current)"
  if [[ -n "${dir}" && -d "${dir}" ]]; then
    run="$(basename "${dir}")"
    if run_alive "${dir}"; then
      state=running
    else
      state=exited
      rc="$(cat "${dir}/exit_code" 2>/dev/null || echo killed)"
    fi
    step="$(grep -oE 'step [0-9]+(/[0-9]+)?' "${dir}/log" 2>/dev/null | tail -n 1 | cut -d' ' -f2)"
    age="$(($(date +%s) - $(stat -c %Y "${dir}/log" 2>/dev/null || date +%s)))"
  fi
  holders="$(tpu_users | tr '\n' ',' | sed 's/,$//')"
  echo "@@DOREMI_STATUS worker=${W} run=${run} state=${state} rc=${rc:--} step=${step:--}" \
    "log_age_s=${age:--} tpu_pids=${holders:--}"
}

cmd_logs() {
  local run="$1" lines="$2" follow="$3" dir pid
  dir="$(run_dir "${run}")"
  if [[ -z "${dir}" || ! -f "${dir}/log" ]]; then
    say "no run ${run} on this worker"
    return 0
  fi
  pid="$(run_pid "${dir}")"
  if [[ "${follow}" == 1 ]] && run_alive "${dir}"; then
    tail -n "${lines}" -s 1 -F --pid="${pid}" "${dir}/log" | sed -u "s/^/[w${W}] /"
  else
    tail -n "${lines}" "${dir}/log" | sed "s/^/[w${W}] /"
  fi
}

cmd_kill() {
  local grace="$1" dir pid was=none
  dir="$(run_dir current)"
  if [[ -n "${dir}" ]] && run_alive "${dir}"; then
    pid="$(run_pid "${dir}")"
    was=running
    say "stopping run $(basename "${dir}") (process group ${pid}; SIGKILL after ${grace} s)"
    terminate "${grace}" "-${pid}"
  fi
  clear_tpu 10
  echo "@@DOREMI_KILLED worker=${W} run=$(basename "${dir:-none}") was=${was}"
}

main() {
  local sub="${1:-}"
  shift || true
  case "${sub}" in
    preflight) cmd_preflight ;;
    start) cmd_start "$@" ;;
    watch) cmd_watch "$@" ;;
    status) cmd_status ;;
    logs) cmd_logs "$@" ;;
    kill) cmd_kill "$@" ;;
    *) echo "tpu_worker.sh: unknown command '${sub}'" >&2; return 2 ;;
  esac
}

main "$@"
