#!/usr/bin/env bash
# Remote paths keep '~/' unexpanded here: the workers' shells expand it.
# shellcheck disable=SC2088
# Runs a doremi_jax stage or pipeline on a Cloud TPU VM slice (every worker).
#
# Creates the slice (or reuses it), installs the project on all workers, runs
# `python -m doremi_jax.<stage>` with gin files and bindings on all workers,
# streams the output (and tees it to a local log file), and deletes the slice
# when asked. Multi-host slices need nothing special: the command runs on
# --worker=all and JAX initializes its distributed runtime from the TPU
# environment (--multihost_tpu). `--stage compile_check` runs locally (no
# slice, no gcloud).
#
# Example:
#   launch/tpu_run.sh --name doremi-v5e16 --zone us-west4-a \
#     --accelerator-type v5litepod-16 --model-dir gs://my-bucket/doremi/proxy \
#     --gin_file gin/runs/doremi.gin --gin_file gin/models/280m.gin \
#     --gin_file gin/hardware/v5e_16.gin --gin TRAIN_STEPS=200000
#
# Run with --help for all flags; docs/TPU.md walks through a first run.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
readonly REPO_ROOT
readonly REMOTE_DIR='~/doremi_jax'
readonly REMOTE_VENV='~/doremi_venv'
readonly REMOTE_TARBALL='~/doremi_jax_src.tar.gz'

usage() {
  cat <<'EOF'
Usage: launch/tpu_run.sh --name NAME --zone ZONE --accelerator-type TYPE [flags]

Slice:
  --name NAME               TPU VM (and queued resource) name. Required.
  --zone ZONE               Zone, e.g. us-west4-a, us-central2-b. Required.
  --accelerator-type TYPE   e.g. v5litepod-8, v5litepod-16, v4-8, v4-32, v5p-8,
                            v6e-8. Required (except with --delete-only).
  --runtime-version V       TPU VM image. Default per family: v5e ->
                            v2-alpha-tpuv5-lite, v4 -> tpu-ubuntu2204-base,
                            v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e.
  --project PROJECT         GCP project (default: gcloud's configured one).
  --queued                  Request the slice as a queued resource and wait
                            until it is ACTIVE.
  --spot                    Spot capacity (cheaper, can be preempted).
  --preemptible             Preemptible capacity (tpu-vm create only; with
                            --queued it means --spot).
  --queue-timeout SECONDS   Give up waiting for a queued resource (default 0:
                            wait forever). Polls every 30 s.

Code:
  --repo URL --ref REF      git clone URL and check out REF on every worker.
                            Default: scp a tarball of this working tree
                            (tracked and untracked, non-ignored files).
  --python VERSION          Python for the workers' venv (default 3.11).
  --skip-install            Reuse the code and venv already on the workers.

Run:
  --stage S                 train | pipeline | eval | compile_check
                            (default train). compile_check runs on this host
                            against the slice's topology and creates nothing.
  --gin_file PATH           Gin file, relative to the repo root (repeatable).
  --gin NAME=VALUE          Gin binding, passed as --gin.NAME=VALUE
                            (repeatable). Strings need gin quotes:
                            --gin MODEL_DIR="'gs://b/x'".
  --model-dir gs://...      Same as --gin MODEL_DIR="'gs://...'".
  --topology NAME           compile_check topology (default: derived from
                            --accelerator-type, e.g. v5litepod-16 -> v5e:4x4).
  --env NAME=VALUE          Environment variable for the run (repeatable).
  --log-dir DIR             Local directory for run logs (default ./tpu_logs).

Lifecycle:
  --delete                  Delete the slice after the run (even if it fails).
  --delete-only             Only delete the slice, then exit.
  --dry-run                 Print the commands, one per line prefixed '+ ',
                            without running anything (gcloud not needed).
  -h, --help                This help.

Re-running the same command after a preemption reuses (or recreates) the slice
and the trainer resumes from the last checkpoint under MODEL_DIR.
EOF
}

die() {
  echo "tpu_run.sh: error: $*" >&2
  echo "Run 'launch/tpu_run.sh --help' for usage." >&2
  exit 2
}

log() { echo "[tpu_run] $*" >&2; }

# Quotes one word for a POSIX shell; plain words stay as they are.
shquote() {
  local s="$1"
  if [[ -n "${s}" && "${s}" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
    printf '%s' "${s}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Joins words into one shell command line, each word quoted as needed.
shjoin() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(shquote "${w}")"
  done
  printf '%s' "${out}"
}

# Like shjoin, but leaves a leading '~/' unquoted so the remote shell expands it.
shjoin_remote() {
  local out="" w
  for w in "$@"; do
    if [[ "${w}" == '~/'* && "${w}" =~ ^~/[A-Za-z0-9_./-]*$ ]]; then
      out+="${out:+ }${w}"
    else
      out+="${out:+ }$(shquote "${w}")"
    fi
  done
  printf '%s' "${out}"
}

# Shows a command line: on stdout in a dry run, else on stderr.
show() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "+ $*"
  else
    echo "+ $*" >&2
  fi
}

# Prints (dry run) or runs a command given as words.
run() {
  show "$(shjoin "$@")"
  if [[ "${DRY_RUN}" == 1 ]]; then
    return 0
  fi
  "$@"
}

# ---------------------------------------------------------------- flags
NAME=""
ZONE=""
ACCEL=""
RUNTIME=""
PROJECT=""
QUEUED=0
SPOT=0
PREEMPTIBLE=0
QUEUE_TIMEOUT=0
REPO_URL=""
REF=""
PYVER="3.11"
SKIP_INSTALL=0
STAGE="train"
GIN_FILES=()
GIN_BINDINGS=()
MODEL_DIR=""
TOPOLOGY=""
ENVS=()
LOG_DIR="./tpu_logs"
DELETE=0
DELETE_ONLY=0
DRY_RUN=0

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "flag $1 needs a value"
}

while [[ $# -gt 0 ]]; do
  flag="$1"
  value=""
  if [[ "${flag}" == --*=* ]]; then
    value="${flag#*=}"
    flag="${flag%%=*}"
    set -- "${flag}" "${value}" "${@:2}"
  fi
  case "${flag}" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --accelerator-type|--accelerator_type) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --runtime-version|--runtime_version) need_value "$@"; RUNTIME="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --queue-timeout) need_value "$@"; QUEUE_TIMEOUT="$2"; shift 2 ;;
    --repo) need_value "$@"; REPO_URL="$2"; shift 2 ;;
    --ref) need_value "$@"; REF="$2"; shift 2 ;;
    --python) need_value "$@"; PYVER="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --stage) need_value "$@"; STAGE="$2"; shift 2 ;;
    --gin_file|--gin-file) need_value "$@"; GIN_FILES+=("$2"); shift 2 ;;
    --gin) need_value "$@"; GIN_BINDINGS+=("$2"); shift 2 ;;
    --model-dir|--model_dir) need_value "$@"; MODEL_DIR="$2"; shift 2 ;;
    --topology) need_value "$@"; TOPOLOGY="$2"; shift 2 ;;
    --env) need_value "$@"; ENVS+=("$2"); shift 2 ;;
    --log-dir) need_value "$@"; LOG_DIR="$2"; shift 2 ;;
    --delete) DELETE=1; shift ;;
    --delete-only) DELETE_ONLY=1; shift ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    *) die "unknown flag: $1" ;;
  esac
done

# ---------------------------------------------------------------- checks
case "${STAGE}" in
  train|pipeline|eval|compile_check) ;;
  *) die "--stage must be one of train, pipeline, eval, compile_check (got '${STAGE}')" ;;
esac

missing=()
if [[ "${STAGE}" != compile_check || "${DELETE_ONLY}" == 1 ]]; then
  [[ -n "${NAME}" ]] || missing+=(--name)
  [[ -n "${ZONE}" ]] || missing+=(--zone)
fi
if [[ "${DELETE_ONLY}" == 0 ]]; then
  if [[ "${STAGE}" != compile_check || -z "${TOPOLOGY}" ]]; then
    [[ -n "${ACCEL}" ]] || missing+=(--accelerator-type)
  fi
  [[ ${#GIN_FILES[@]} -gt 0 ]] || missing+=(--gin_file)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  die "missing required flag(s): ${missing[*]}"
fi

for b in ${GIN_BINDINGS[@]+"${GIN_BINDINGS[@]}"}; do
  [[ "${b}" =~ ^[A-Za-z_][A-Za-z0-9_./]*=.+ ]] \
    || die "--gin expects NAME=VALUE (got '${b}')"
done
for e in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ "${e}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects NAME=VALUE (got '${e}')"
done
if [[ -n "${REPO_URL}" && -z "${REF}" ]]; then
  REF="main"
fi
if [[ -n "${REF}" && -z "${REPO_URL}" ]]; then
  die "--ref needs --repo"
fi
if [[ -n "${MODEL_DIR}" && "${MODEL_DIR}" != gs://* && "${STAGE}" != compile_check ]]; then
  log "warning: --model-dir ${MODEL_DIR} is not a gs:// path; workers do not share local disks."
fi
[[ "${QUEUE_TIMEOUT}" =~ ^[0-9]+$ ]] || die "--queue-timeout must be a number of seconds"

# Accelerator family and default runtime image.
family=""
if [[ -n "${ACCEL}" ]]; then
  case "${ACCEL}" in
    v5litepod-*|v5e-*) family=v5e ;;
    v5p-*) family=v5p ;;
    v6e-*) family=v6e ;;
    v4-*) family=v4 ;;
    v3-*) family=v3 ;;
    v2-*) family=v2 ;;
    *) die "unknown --accelerator-type '${ACCEL}' (examples: v5litepod-16, v4-32, v5p-8, v6e-8)" ;;
  esac
  [[ "${ACCEL##*-}" =~ ^[0-9]+$ ]] || die "bad --accelerator-type '${ACCEL}': expected FAMILY-SIZE, e.g. v4-32"
fi
if [[ -z "${RUNTIME}" ]]; then
  case "${family}" in
    v5e) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p) RUNTIME=v2-alpha-tpuv5 ;;
    v6e) RUNTIME=v2-alpha-tpuv6e ;;
    v4) RUNTIME=tpu-ubuntu2204-base ;;
    v3|v2) RUNTIME=tpu-ubuntu2204-base ;;
  esac
fi

# Topology name for the compile check, e.g. v5litepod-16 -> v5e:4x4.
topology_for() {
  local n="${ACCEL##*-}"
  case "${family}" in
    v5e|v6e)
      case "${n}" in
        1) echo "${family}:1x1" ;; 4) echo "${family}:2x2" ;; 8) echo "${family}:2x4" ;;
        16) echo "${family}:4x4" ;; 32) echo "${family}:4x8" ;; 64) echo "${family}:8x8" ;;
        128) echo "${family}:8x16" ;; 256) echo "${family}:16x16" ;;
        *) return 1 ;;
      esac ;;
    v4|v5p)
      # Sizes count TensorCores: two per chip.
      case "${n}" in
        8) echo "${family}:2x2x1" ;; 16) echo "${family}:2x2x2" ;; 32) echo "${family}:2x2x4" ;;
        64) echo "${family}:2x4x4" ;; 128) echo "${family}:4x4x4" ;; 256) echo "${family}:4x4x8" ;;
        512) echo "${family}:4x8x8" ;; 1024) echo "${family}:8x8x8" ;;
        *) return 1 ;;
      esac ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------- commands
gcloud_scope=(--zone "${ZONE}")
if [[ -n "${PROJECT}" ]]; then
  gcloud_scope+=(--project "${PROJECT}")
fi

# The python command every worker runs.
case "${STAGE}" in
  train) module=doremi_jax.train ;;
  pipeline) module=doremi_jax.pipeline ;;
  eval) module=doremi_jax.evaluate ;;
  compile_check) module=doremi_jax.compile_check ;;
esac
py_args=(-m "${module}")
if [[ "${STAGE}" != compile_check ]]; then
  # JAX's distributed runtime from the TPU environment (all hosts of the slice).
  py_args+=(--multihost_tpu)
fi
for f in "${GIN_FILES[@]}"; do
  py_args+=("--gin_file=${f}")
done
if [[ -n "${MODEL_DIR}" ]]; then
  py_args+=("--gin.MODEL_DIR='${MODEL_DIR}'")
fi
for b in ${GIN_BINDINGS[@]+"${GIN_BINDINGS[@]}"}; do
  py_args+=("--gin.${b}")
done

delete_slice() {
  if [[ "${QUEUED}" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "${NAME}" "${gcloud_scope[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "${NAME}" "${gcloud_scope[@]}" --quiet
  fi
}

# Prints the slice's state (READY, PREEMPTED, ...) or nothing if it is absent.
slice_state() {
  gcloud compute tpus tpu-vm describe "${NAME}" "${gcloud_scope[@]}" \
    --format='value(state)' 2>/dev/null || true
}

create_slice() {
  local cap=()
  if [[ "${QUEUED}" == 1 ]]; then
    if [[ "${SPOT}" == 1 || "${PREEMPTIBLE}" == 1 ]]; then cap=(--spot); fi
    run gcloud compute tpus queued-resources create "${NAME}" --node-id "${NAME}" \
      "${gcloud_scope[@]}" --accelerator-type "${ACCEL}" --runtime-version "${RUNTIME}" \
      ${cap[@]+"${cap[@]}"}
    wait_active
  else
    if [[ "${SPOT}" == 1 ]]; then cap=(--spot); elif [[ "${PREEMPTIBLE}" == 1 ]]; then cap=(--preemptible); fi
    run gcloud compute tpus tpu-vm create "${NAME}" "${gcloud_scope[@]}" \
      --accelerator-type "${ACCEL}" --version "${RUNTIME}" ${cap[@]+"${cap[@]}"}
  fi
}

wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "${NAME}" "${gcloud_scope[@]}"
                  --format='value(state.state)')
  if [[ "${DRY_RUN}" == 1 ]]; then
    show "$(shjoin "${describe[@]}")  # repeated every 30 s until ACTIVE"
    return 0
  fi
  local start=${SECONDS} state
  while true; do
    state="$("${describe[@]}" 2>/dev/null || true)"
    case "${state}" in
      ACTIVE) log "queued resource ${NAME} is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED)
        echo "tpu_run.sh: queued resource ${NAME} is ${state}; see" \
          "'gcloud compute tpus queued-resources describe ${NAME} --zone ${ZONE}'" >&2
        exit 1 ;;
    esac
    if [[ "${QUEUE_TIMEOUT}" -gt 0 && $((SECONDS - start)) -ge "${QUEUE_TIMEOUT}" ]]; then
      echo "tpu_run.sh: queued resource ${NAME} not ACTIVE after ${QUEUE_TIMEOUT} s (state: ${state:-unknown})" >&2
      exit 1
    fi
    log "queued resource ${NAME}: ${state:-unknown}; waiting"
    sleep 30
  done
}

# Prints the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, ...) or nothing.
queued_state() {
  gcloud compute tpus queued-resources describe "${NAME}" "${gcloud_scope[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

ensure_slice() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    if [[ "${QUEUED}" == 1 ]]; then
      show "$(shjoin gcloud compute tpus queued-resources describe "${NAME}" "${gcloud_scope[@]}" \
        --format='value(state.state)')  # reuse if ACTIVE and READY, else create"
    else
      show "$(shjoin gcloud compute tpus tpu-vm describe "${NAME}" "${gcloud_scope[@]}" \
        --format='value(state)')  # reuse if READY, else create"
    fi
    create_slice
    return 0
  fi
  local state
  if [[ "${QUEUED}" == 1 ]]; then
    state="$(queued_state)"
    case "${state}" in
      "") log "requesting queued resource ${NAME} (${ACCEL}, ${RUNTIME})"; create_slice; return 0 ;;
      ACTIVE) ;;
      SUSPENDED|SUSPENDING|FAILED)
        log "queued resource ${NAME} is ${state}; deleting and requesting it again"
        delete_slice
        create_slice
        return 0 ;;
      *) log "queued resource ${NAME} is ${state}"; wait_active ;;
    esac
  fi
  state="$(slice_state)"
  case "${state}" in
    READY) log "reusing TPU VM ${NAME} (READY)" ;;
    "") log "creating TPU VM ${NAME} (${ACCEL}, ${RUNTIME})"; create_slice ;;
    PREEMPTED|TERMINATED|FAILED|STOPPED)
      log "TPU VM ${NAME} is ${state}; deleting and recreating it"
      delete_slice
      create_slice ;;
    CREATING|STARTING|RESTARTING|REPAIRING)
      log "TPU VM ${NAME} is ${state}; waiting for READY"
      while [[ "$(slice_state)" != READY ]]; do sleep 20; done ;;
    *) echo "tpu_run.sh: TPU VM ${NAME} is in state ${state}; not touching it" >&2; exit 1 ;;
  esac
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "${NAME}" "${gcloud_scope[@]}" --worker=all --command "$1"
}

install_code() {
  local fetch
  if [[ -n "${REPO_URL}" ]]; then
    fetch="rm -rf ${REMOTE_DIR} && $(shjoin_remote git clone --quiet "${REPO_URL}" "${REMOTE_DIR}")"
    fetch+=" && $(shjoin_remote git -C "${REMOTE_DIR}" checkout --quiet "${REF}")"
  else
    local tarball="${TMPDIR:-/tmp}/doremi_jax_src_${NAME}.tar.gz"
    if [[ "${DRY_RUN}" == 1 ]]; then
      show "tar -czf $(shquote "${tarball}") -C $(shquote "${REPO_ROOT}") --null -T -  # git ls-files --cached --others --exclude-standard"
    else
      make_tarball "${tarball}"
    fi
    run gcloud compute tpus tpu-vm scp "${tarball}" "${NAME}:${REMOTE_TARBALL#~/}" \
      "${gcloud_scope[@]}" --worker=all
    fetch="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf ${REMOTE_TARBALL} -C ${REMOTE_DIR}"
  fi
  # TPU VM images ship Python 3.10; uv provides the Python the project needs.
  local setup="set -e; ${fetch}"
  setup+=" && { [ -x ~/.local/bin/uv ] || python3 -m pip install --quiet --user uv"
  setup+=" || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
  setup+=" && ~/.local/bin/uv venv --quiet --allow-existing --python $(shquote "${PYVER}") ${REMOTE_VENV}"
  setup+=" && cd ${REMOTE_DIR} && VIRTUAL_ENV=${REMOTE_VENV} ~/.local/bin/uv pip install --quiet -e '.[tpu]'"
  ssh_all "${setup}"
}

make_tarball() {
  local tarball="$1"
  if git -C "${REPO_ROOT}" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # shellcheck disable=SC2016  # $f expands in the inner sh.
    (cd "${REPO_ROOT}" && git ls-files -z --cached --others --exclude-standard \
      | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _ \
      | tar -czf "${tarball}" --null -T -)
  else
    tar -czf "${tarball}" -C "${REPO_ROOT}" --exclude=.git --exclude=.venv \
      --exclude=__pycache__ --exclude=tpu_logs .
  fi
  log "packed working tree: ${tarball} ($(du -h "${tarball}" | cut -f1))"
}

run_stage() {
  local envs=""
  local e
  for e in ${ENVS[@]+"${ENVS[@]}"}; do
    envs+="export $(shquote "${e}") && "
  done
  local cmd logfile
  cmd="cd ${REMOTE_DIR} && ${envs}${REMOTE_VENV}/bin/python $(shjoin "${py_args[@]}")"
  logfile="${LOG_DIR}/${NAME}-${STAGE}-$(date +%Y%m%d-%H%M%S).log"
  if [[ "${DRY_RUN}" == 1 ]]; then
    ssh_all "${cmd}"
    show "# output streamed to the terminal and to ${logfile}"
    return 0
  fi
  mkdir -p "${LOG_DIR}"
  log "running on all workers of ${NAME}; log: ${logfile}"
  echo "+ $(shjoin gcloud compute tpus tpu-vm ssh "${NAME}" "${gcloud_scope[@]}" --worker=all --command "${cmd}")" \
    | tee -a "${logfile}" >&2
  gcloud compute tpus tpu-vm ssh "${NAME}" "${gcloud_scope[@]}" --worker=all --command "${cmd}" 2>&1 \
    | tee -a "${logfile}"
}

compile_check_locally() {
  local topo="${TOPOLOGY}"
  if [[ -z "${topo}" ]]; then
    topo="$(topology_for)" || die "no known topology for ${ACCEL}; pass --topology (e.g. v5e:4x4, v4:2x2x4)"
  fi
  local py="${PYTHON:-python3}"
  run "${py}" "${py_args[@]}" "--topology=${topo}"
}

# ---------------------------------------------------------------- main
if [[ "${DRY_RUN}" == 0 && ( "${STAGE}" != compile_check || "${DELETE_ONLY}" == 1 ) ]]; then
  command -v gcloud >/dev/null 2>&1 \
    || { echo "tpu_run.sh: gcloud not found; install the Google Cloud CLI (or use --dry-run)" >&2; exit 2; }
fi

if [[ "${DELETE_ONLY}" == 1 ]]; then
  delete_slice
  exit 0
fi

if [[ "${STAGE}" == compile_check ]]; then
  cd "${REPO_ROOT}"
  compile_check_locally
  exit $?
fi

ensure_slice
if [[ "${DELETE}" == 1 ]]; then
  # Delete even when install or run fails; keep the run's exit status.
  # shellcheck disable=SC2154  # rc is set inside the trap.
  trap 'rc=$?; trap - EXIT; delete_slice || true; exit ${rc}' EXIT
fi
if [[ "${SKIP_INSTALL}" == 0 ]]; then
  install_code
fi
run_stage
