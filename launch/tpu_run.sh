#!/usr/bin/env bash
# Remote paths keep '~/' unexpanded here: the workers' shells expand it.
# shellcheck disable=SC2088
# Runs a doremi_jax stage or pipeline on a Cloud TPU VM slice (every worker), detached from ssh.
#
#   launch/tpu_run.sh [run] FLAGS    create or reuse the slice, install, start the run on every
#                                    worker under setsid/nohup, and follow it (fail-fast)
#   launch/tpu_run.sh status FLAGS   slice state; per worker: run alive, exit status, last step
#   launch/tpu_run.sh logs FLAGS     the workers' logs (follow; --worker N for one)
#   launch/tpu_run.sh attach FLAGS   follow a detached run again, with fail-fast
#   launch/tpu_run.sh kill FLAGS     stop the run on every worker and clear the TPU locks
#   launch/tpu_run.sh delete FLAGS   delete the slice (or the queued resource)
#
# Money: a cleanup trap is in place before anything is requested. A queued request that is not
# ACTIVE when the script exits (timeout, Ctrl-C, error) is deleted, and carries
# --valid-until-duration so that it expires even if this script is killed; a slice this
# invocation was creating is deleted if it exits before the slice is READY; --delete deletes
# the slice on every exit. Every wait is bounded and stops on PREEMPTED or a missing slice;
# gcloud's errors are shown, never taken for "no slice".
#
# Runs: stale processes holding the TPU are stopped first; the run is started detached on
# every worker (a dropped ssh connection neither stops nor duplicates it), its log kept on the
# worker, copied to MODEL_DIR/tpu_logs/ (gs://) and, while followed, to --log-dir per worker.
# When one worker's process fails, the others are stopped and the script exits with that
# status. --retries N recreates a preempted slice and runs the same command again (the trainer
# resumes from MODEL_DIR; the pipeline skips finished stages). The workers' side is
# launch/tpu_worker.sh, sent inline with each ssh command. `--stage compile_check` runs locally.
#
# Example:
#   launch/tpu_run.sh --name doremi-v5e16 --zone us-west4-a \
#     --accelerator-type v5litepod-16 --model-dir gs://my-bucket/doremi/proxy \
#     --gin_file gin/runs/doremi.gin --gin_file gin/models/280m.gin \
#     --gin_file gin/hardware/v5e_16.gin --gin TRAIN_STEPS=200000
#
# Run with --help for all flags; docs/TPU.md walks through a first run.
set -euo pipefail
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "tpu_run.sh: needs bash 4.4 or newer (this is ${BASH_VERSION}; macOS: brew install bash)" >&2
  exit 2
fi

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
readonly REPO_ROOT
readonly REMOTE_DIR='~/doremi_jax'
readonly REMOTE_VENV='~/doremi_venv'
readonly REMOTE_TARBALL='~/doremi_jax_src.tar.gz'
readonly PREEMPTED=10  # internal status: the slice was preempted or disappeared

usage() {
  cat <<'EOF'
Usage: launch/tpu_run.sh [run|status|logs|attach|kill|delete] --name NAME --zone ZONE [flags]

Commands (default: run):
  run      Create or reuse the slice, stop stale TPU processes, install the code, start the
           stage detached on every worker and follow it. Ctrl-C stops following; the run goes
           on (unless --delete). Exit status: the run's (the failing worker's), 1 for a slice
           that could not be had, 2 for bad flags.
  status   Slice state and, per worker: run alive or exit status, last logged step.
  logs     Print the workers' logs: --worker N|all, --lines K, --no-follow.
  attach   Follow a detached run again (all workers, fail-fast), until it ends.
  kill     Stop the run on every worker (SIGTERM: the trainer checkpoints; SIGKILL after
           --kill-grace) and every other process holding the TPU; remove the libtpu lock.
  delete   Delete the slice (--queued: the queued resource and its slice). Same as --delete-only.

Slice:
  --name NAME               TPU VM (and queued resource) name. Required.
  --zone ZONE               Zone; checked against the accelerator family (see --skip-zone-check).
  --accelerator-type TYPE   v5litepod-{1,4,8,16,...,256}, v6e-N, v4-N, v5p-N, v3-N, v2-N.
                            Required for run.
  --runtime-version V       TPU VM image. Default per family: v5e -> v2-alpha-tpuv5-lite,
                            v4 -> tpu-ubuntu2204-base, v5p -> v2-alpha-tpuv5, v6e ->
                            v2-alpha-tpuv6e.
  --project PROJECT         GCP project (default: gcloud's configured one).
  --queued                  Request the slice as a queued resource; wait until ACTIVE.
  --spot                    Spot capacity (cheaper, can be preempted).
  --preemptible             Preemptible capacity (tpu-vm create only; with --queued: --spot).
  --queue-timeout DURATION  Longest wait for a queued resource (default 24h); also its
                            --valid-until-duration. On timeout the request is deleted.
                            DURATION: seconds, or 90s, 30m, 12h, 2d.
  --ready-timeout DURATION  Longest wait for the slice to be READY (default 30m).
  --poll-interval SECONDS   Between state checks (default 30).
  --internal-ip             Internal IPs only (create: --internal-ips; ssh/scp: --internal-ip).
  --network NET, --subnetwork SUBNET, --service-account EMAIL, --scopes SCOPES,
  --labels K=V[,K=V]        Passed to the create command.
  --skip-zone-check         Accept a zone the built-in table does not list for the family.

Code:
  --repo URL --ref REF      git clone URL and check out REF on every worker.
                            Default: scp a tarball of this working tree
                            (tracked and untracked, non-ignored files; never tpu_logs/).
  --python VERSION          Python for the workers' venv (default 3.11).
  --jax-version V           jax[tpu]==V on the workers (default: this machine's jax version;
                            'none': unpinned).
  --skip-install            Reuse the code and venv already on the workers (ignored on a
                            slice this invocation created).

Run:
  --stage S                 train | pipeline | eval | compile_check (default train).
                            compile_check runs on this host against the slice's topology.
  --gin_file PATH           Gin file, relative to the repo root (repeatable).
  --gin NAME=VALUE          Gin binding, passed as --gin.NAME=VALUE (repeatable). Strings
                            need gin quotes: --gin MODEL_DIR="'gs://b/x'".
  --model-dir gs://...      The run's output dir: --gin MODEL_DIR='...' (train, eval) or
                            --gin PIPELINE_DIR='...' (pipeline). gs:// on multi-host slices.
  --compilation-cache DIR   Persistent JAX compilation cache (JAX_COMPILATION_CACHE_DIR).
                            Default for a gs:// model dir: gs://BUCKET/jax_compilation_cache;
                            'none' to turn it off.
  --topology NAME           compile_check topology (default: from --accelerator-type).
  --env NAME=VALUE          Environment variable for the run (repeatable).
  --retries N               After a preemption, recreate (or wait for) the slice and run the
                            same command again, up to N times (default 0).
  --restart                 Stop a run that is still running on the slice, then start anew
                            (default: refuse, and name status/attach/kill).
  --kill-grace SECONDS      SIGTERM to SIGKILL, for kill and fail-fast (default 120).
  --no-ssh-agent-check      Skip the check that the gcloud ssh key is in ssh-agent
                            (multi-worker slices need it for --worker=all).
  --log-dir DIR             Local logs: DIR/NAME/RUN/worker-N.log (default ./tpu_logs).

logs and attach:
  --worker N|all            One worker, or all (default all).
  --lines K                 Lines of history to print first (default 100).
  --no-follow               Print and exit.
  --run RUN                 A run id (default: the latest on each worker).

Lifecycle:
  --delete                  Delete the slice when this script exits, whatever the outcome.
  --delete-only             Only delete the slice, then exit.
  --dry-run                 Print the commands, one per line prefixed '+ ', without running
                            anything (gcloud not needed). The packed launch/tpu_worker.sh
                            that the workers run shows as <tpu_worker.sh>.
  -h, --help                This help.
EOF
}

die() {
  echo "tpu_run.sh: error: $*" >&2
  echo "Run 'launch/tpu_run.sh --help' for usage." >&2
  exit 2
}

# An error that is not about the flags: exit status $2 (default 1).
fatal() {
  echo "tpu_run.sh: error: $1" >&2
  exit "${2:-1}"
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

# Seconds from a duration: 90, 90s, 30m, 12h, 2d.
parse_duration() {
  local d="$1"
  [[ "${d}" =~ ^([0-9]+)([smhd]?)$ ]] || return 1
  local n="${BASH_REMATCH[1]}"
  case "${BASH_REMATCH[2]}" in
    m) n=$((n * 60)) ;; h) n=$((n * 3600)) ;; d) n=$((n * 86400)) ;;
  esac
  echo "${n}"
}

# ---------------------------------------------------------------- flags
COMMAND=run

NAME=""
ZONE=""
ACCEL=""
RUNTIME=""
PROJECT=""
QUEUED=0
SPOT=0
PREEMPTIBLE=0
QUEUE_TIMEOUT_ARG="24h"
READY_TIMEOUT_ARG="30m"
POLL="30"
INTERNAL_IP=0
NETWORK=""
SUBNETWORK=""
SERVICE_ACCOUNT=""
SCOPES=""
LABELS=""
SKIP_ZONE_CHECK=0
REPO_URL=""
REF=""
PYVER="3.11"
JAX_VERSION=""
SKIP_INSTALL=0
STAGE="train"
GIN_FILES=()
GIN_BINDINGS=()
MODEL_DIR=""
COMPILATION_CACHE=""
TOPOLOGY=""
ENVS=()
RETRIES=0
RESTART=0
KILL_GRACE=120
SSH_AGENT_CHECK=1
LOG_DIR="./tpu_logs"
WORKER="all"
LINES=100
FOLLOW=1
RUN_ARG="current"
DELETE=0
DELETE_ONLY=0
DRY_RUN=0

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "flag $1 needs a value"
}

while [[ $# -gt 0 ]]; do
  flag="$1"
  if [[ "${flag}" == --*=* ]]; then
    set -- "${flag%%=*}" "${flag#*=}" "${@:2}"
    flag="$1"
  fi
  case "${flag}" in
    -h|--help) usage; exit 0 ;;
    run|status|logs|attach|kill|delete) COMMAND="$1"; shift ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --accelerator-type|--accelerator_type) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --runtime-version|--runtime_version) need_value "$@"; RUNTIME="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --queue-timeout) need_value "$@"; QUEUE_TIMEOUT_ARG="$2"; shift 2 ;;
    --ready-timeout) need_value "$@"; READY_TIMEOUT_ARG="$2"; shift 2 ;;
    --poll-interval) need_value "$@"; POLL="$2"; shift 2 ;;
    --internal-ip|--internal-ips) INTERNAL_IP=1; shift ;;
    --network) need_value "$@"; NETWORK="$2"; shift 2 ;;
    --subnetwork) need_value "$@"; SUBNETWORK="$2"; shift 2 ;;
    --service-account) need_value "$@"; SERVICE_ACCOUNT="$2"; shift 2 ;;
    --scopes) need_value "$@"; SCOPES="$2"; shift 2 ;;
    --labels) need_value "$@"; LABELS="$2"; shift 2 ;;
    --skip-zone-check) SKIP_ZONE_CHECK=1; shift ;;
    --repo) need_value "$@"; REPO_URL="$2"; shift 2 ;;
    --ref) need_value "$@"; REF="$2"; shift 2 ;;
    --python) need_value "$@"; PYVER="$2"; shift 2 ;;
    --jax-version) need_value "$@"; JAX_VERSION="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --stage) need_value "$@"; STAGE="$2"; shift 2 ;;
    --gin_file|--gin-file) need_value "$@"; GIN_FILES+=("$2"); shift 2 ;;
    --gin) need_value "$@"; GIN_BINDINGS+=("$2"); shift 2 ;;
    --model-dir|--model_dir) need_value "$@"; MODEL_DIR="$2"; shift 2 ;;
    --compilation-cache) need_value "$@"; COMPILATION_CACHE="$2"; shift 2 ;;
    --topology) need_value "$@"; TOPOLOGY="$2"; shift 2 ;;
    --env) need_value "$@"; ENVS+=("$2"); shift 2 ;;
    --retries) need_value "$@"; RETRIES="$2"; shift 2 ;;
    --restart) RESTART=1; shift ;;
    --kill-grace) need_value "$@"; KILL_GRACE="$2"; shift 2 ;;
    --no-ssh-agent-check) SSH_AGENT_CHECK=0; shift ;;
    --log-dir) need_value "$@"; LOG_DIR="$2"; shift 2 ;;
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --lines) need_value "$@"; LINES="$2"; shift 2 ;;
    --no-follow) FOLLOW=0; shift ;;
    --run) need_value "$@"; RUN_ARG="$2"; shift 2 ;;
    --delete) DELETE=1; shift ;;
    --delete-only) DELETE_ONLY=1; shift ;;
    --dry-run|--dry_run) DRY_RUN=1; shift ;;
    *) die "unknown flag: $1" ;;
  esac
done
if [[ "${DELETE_ONLY}" == 1 ]]; then
  COMMAND=delete
fi

# ---------------------------------------------------------------- tables
# Zones per TPU family: https://cloud.google.com/tpu/docs/regions-zones, read 2026-11. Zones
# marked there as single-tenant only (reservations) are in *_RESERVED. The table ages:
# --skip-zone-check accepts a zone it does not list.
declare -A ZONES=(
  [v6e]="us-central1-b us-east1-d us-east5-a us-east5-b us-west1-c europe-west4-a asia-northeast1-b"
  [v5p]="us-central1-a us-east5-a europe-west4-b"
  [v5e]="us-central1-a us-south1-a us-west1-c us-west4-a us-west4-b europe-west4-b asia-southeast1-b"
  [v4]="us-central2-b"
  [v3]="us-central1-a us-central1-b us-central1-f europe-west4-a"
  [v2]="us-central1-a us-central1-b us-central1-c us-central1-f europe-west4-a asia-east1-c"
)
declare -A ZONES_RESERVED=(
  [v6e]="us-east5-c us-east4-a us-east4-b"
  [v5p]="us-east5-b us-east5-c us-south1-a"
  [v5e]="us-east5-a us-east5-b us-east5-c"
)

# The family of an accelerator type, or nothing if the type is unknown.
family_of() {
  local n="${1##*-}"
  [[ "${n}" =~ ^[0-9]+$ ]] || return 0
  case "$1" in
    v5litepod-*|v6e-*)
      case "${n}" in 1|4|8|16|32|64|128|256) ;; *) return 0 ;; esac
      [[ "$1" == v6e-* ]] && echo v6e || echo v5e ;;
    v4-*|v5p-*)
      # TensorCores (two per chip, four chips per host).
      ((n >= 8 && n % 8 == 0 && n <= 12288)) || return 0
      echo "${1%%-*}" ;;
    v3-*) case "${n}" in 8|32|64|128|256|512|1024|2048) echo v3 ;; esac ;;
    v2-*) case "${n}" in 8|32|128|256|512) echo v2 ;; esac ;;
  esac
}

# Hosts (TPU VM workers) of an accelerator type.
hosts_of() {
  local n="${1##*-}"
  case "$1" in
    v5litepod-*|v6e-*) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    *) echo $((n >= 8 ? n / 8 : 1)) ;;
  esac
}

# Topology name for the compile check, e.g. v5litepod-16 -> v5e:4x4.
topology_for() {
  local n="${ACCEL##*-}"
  case "${FAMILY}" in
    v5e|v6e)
      case "${n}" in
        1) echo "${FAMILY}:1x1" ;; 4) echo "${FAMILY}:2x2" ;; 8) echo "${FAMILY}:2x4" ;;
        16) echo "${FAMILY}:4x4" ;; 32) echo "${FAMILY}:4x8" ;; 64) echo "${FAMILY}:8x8" ;;
        128) echo "${FAMILY}:8x16" ;; 256) echo "${FAMILY}:16x16" ;;
        *) return 1 ;;
      esac ;;
    v4|v5p)
      # Sizes count TensorCores: two per chip.
      case "${n}" in
        8) echo "${FAMILY}:2x2x1" ;; 16) echo "${FAMILY}:2x2x2" ;; 32) echo "${FAMILY}:2x2x4" ;;
        64) echo "${FAMILY}:2x4x4" ;; 128) echo "${FAMILY}:4x4x4" ;; 256) echo "${FAMILY}:4x4x8" ;;
        512) echo "${FAMILY}:4x8x8" ;; 1024) echo "${FAMILY}:8x8x8" ;;
        *) return 1 ;;
      esac ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------- checks (no gcloud)
case "${STAGE}" in
  train|pipeline|eval|compile_check) ;;
  *) die "--stage must be one of train, pipeline, eval, compile_check (got '${STAGE}')" ;;
esac
if [[ "${COMMAND}" != run ]]; then
  [[ "${STAGE}" != compile_check ]] || die "--stage compile_check runs locally; no '${COMMAND}'"
fi

missing=()
if [[ "${COMMAND}" != run || "${STAGE}" != compile_check ]]; then
  [[ -n "${NAME}" ]] || missing+=(--name)
  [[ -n "${ZONE}" ]] || missing+=(--zone)
fi
if [[ "${COMMAND}" == run ]]; then
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
QUEUE_TIMEOUT="$(parse_duration "${QUEUE_TIMEOUT_ARG}")" \
  || die "--queue-timeout expects a duration (3600, 90s, 30m, 12h, 2d), got '${QUEUE_TIMEOUT_ARG}'"
READY_TIMEOUT="$(parse_duration "${READY_TIMEOUT_ARG}")" \
  || die "--ready-timeout expects a duration (3600, 90s, 30m, 12h, 2d), got '${READY_TIMEOUT_ARG}'"
((QUEUE_TIMEOUT > 0)) || die "--queue-timeout must be more than 0: every wait is bounded"
((READY_TIMEOUT > 0)) || die "--ready-timeout must be more than 0: every wait is bounded"
[[ "${POLL}" =~ ^[0-9]+(\.[0-9]+)?$ && "${POLL}" != 0 ]] \
  || die "--poll-interval expects a positive number of seconds"
[[ "${RETRIES}" =~ ^[0-9]+$ ]] || die "--retries expects a number"
[[ "${KILL_GRACE}" =~ ^[0-9]+$ ]] || die "--kill-grace expects seconds"
[[ "${LINES}" =~ ^[0-9]+$ ]] || die "--lines expects a number"
[[ "${WORKER}" == all || "${WORKER}" =~ ^[0-9]+$ ]] || die "--worker expects a number or 'all'"
[[ "${RUN_ARG}" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run expects a run id"

# Accelerator: known type, default runtime, hosts, zone.
FAMILY=""
HOSTS=1
if [[ -n "${ACCEL}" ]]; then
  FAMILY="$(family_of "${ACCEL}")"
  if [[ -z "${FAMILY}" ]]; then
    die "unknown --accelerator-type '${ACCEL}' (known: v5litepod-{1,4,8,16,32,64,128,256}," \
      "v6e-{1,...,256}, v4-N and v5p-N with N a multiple of 8, v3-{8,32,...,2048}, v2-{8,...,512})"
  fi
  HOSTS="$(hosts_of "${ACCEL}")"
fi
if [[ -z "${RUNTIME}" ]]; then
  case "${FAMILY}" in
    v5e) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p) RUNTIME=v2-alpha-tpuv5 ;;
    v6e) RUNTIME=v2-alpha-tpuv6e ;;
    v4|v3|v2) RUNTIME=tpu-ubuntu2204-base ;;
  esac
fi
if [[ -n "${FAMILY}" && -n "${ZONE}" && "${SKIP_ZONE_CHECK}" == 0 \
      && ( "${COMMAND}" == run && "${STAGE}" != compile_check ) ]]; then
  if [[ " ${ZONES_RESERVED[${FAMILY}]:-} " == *" ${ZONE} "* ]]; then
    log "note: ${ZONE} offers ${FAMILY} as single-tenant capacity (a reservation) only"
  elif [[ " ${ZONES[${FAMILY}]} " != *" ${ZONE} "* ]]; then
    die "${ACCEL} (${FAMILY}) is not offered in ${ZONE}; zones: ${ZONES[${FAMILY}]}" \
      "(https://cloud.google.com/tpu/docs/regions-zones; --skip-zone-check if the table is stale)"
  fi
fi

# Gin files: relative to the repository, and there.
for f in ${GIN_FILES[@]+"${GIN_FILES[@]}"}; do
  [[ "${f}" != /* && "${f}" != '~'* ]] \
    || die "--gin_file ${f}: use a path relative to the repository root (e.g. gin/runs/doremi.gin)"
  [[ "/${f}/" != */../* ]] || die "--gin_file ${f}: the path leaves the repository"
  if [[ ! -f "${REPO_ROOT}/${f}" ]]; then
    if [[ -n "${REPO_URL}" ]]; then
      log "warning: ${f} is not in this checkout; it must be in ${REPO_URL} at ${REF}"
    else
      die "--gin_file ${f}: no such file under ${REPO_ROOT}"
    fi
  fi
done

# The run's output directory: MODEL_DIR (train, eval) or PIPELINE_DIR (pipeline).
OUT_VAR=MODEL_DIR
if [[ "${STAGE}" == pipeline ]]; then
  OUT_VAR=PIPELINE_DIR
fi
OUT_DIR="${MODEL_DIR}"
for b in ${GIN_BINDINGS[@]+"${GIN_BINDINGS[@]}"}; do
  if [[ "${b}" == "${OUT_VAR}="* ]]; then
    OUT_DIR="${b#*=}"
    OUT_DIR="${OUT_DIR//\'/}"
    OUT_DIR="${OUT_DIR//\"/}"
  fi
done
if [[ "${COMMAND}" == run && "${STAGE}" != compile_check ]]; then
  if [[ "${HOSTS}" -gt 1 && "${OUT_DIR}" != gs://* ]]; then
    die "${ACCEL} has ${HOSTS} hosts: --model-dir must be a gs:// path that every host shares" \
      "(got '${OUT_DIR:-none}')"
  fi
  if [[ -n "${OUT_DIR}" && "${OUT_DIR}" != gs://* ]]; then
    log "warning: ${OUT_VAR} ${OUT_DIR} is on the VM's disk: it is lost with the slice," \
      "and --retries cannot resume from it"
  fi
fi

# The persistent compilation cache: in the bucket by default.
if [[ -z "${COMPILATION_CACHE}" && "${OUT_DIR}" == gs://* ]]; then
  bucket="${OUT_DIR#gs://}"
  COMPILATION_CACHE="gs://${bucket%%/*}/jax_compilation_cache"
fi
if [[ "${COMPILATION_CACHE}" == none ]]; then
  COMPILATION_CACHE=""
fi

# The workers get the jax version this machine has, not "latest".
# (Even with --skip-install: a recreated slice is installed anew.)
if [[ "${COMMAND}" == run && "${STAGE}" != compile_check && -z "${JAX_VERSION}" ]]; then
  for py in "${PYTHON:-}" "${REPO_ROOT}/.venv/bin/python" python3; do
    if [[ -z "${py}" ]] || ! command -v "${py}" >/dev/null 2>&1; then continue; fi
    JAX_VERSION="$("${py}" -c 'import importlib.metadata as m; print(m.version("jax"))' \
      2>/dev/null)" && break
    JAX_VERSION=""
  done
  [[ -n "${JAX_VERSION}" ]] \
    || die "no local jax found to pin the workers' jax[tpu]; pass --jax-version V (or 'none')"
fi

# ---------------------------------------------------------------- gcloud pieces
gcloud_scope=(--zone "${ZONE}")
if [[ -n "${PROJECT}" ]]; then
  gcloud_scope+=(--project "${PROJECT}")
fi
ssh_flags=()
if [[ "${INTERNAL_IP}" == 1 ]]; then
  ssh_flags+=(--internal-ip)
fi
create_flags=()
[[ "${INTERNAL_IP}" == 0 ]] || create_flags+=(--internal-ips)
[[ -z "${NETWORK}" ]] || create_flags+=(--network "${NETWORK}")
[[ -z "${SUBNETWORK}" ]] || create_flags+=(--subnetwork "${SUBNETWORK}")
[[ -z "${SERVICE_ACCOUNT}" ]] || create_flags+=(--service-account "${SERVICE_ACCOUNT}")
[[ -z "${SCOPES}" ]] || create_flags+=(--scopes "${SCOPES}")
[[ -z "${LABELS}" ]] || create_flags+=(--labels "${LABELS}")

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
for f in ${GIN_FILES[@]+"${GIN_FILES[@]}"}; do
  py_args+=("--gin_file=${f}")
done
if [[ -n "${MODEL_DIR}" ]]; then
  py_args+=("--gin.${OUT_VAR}='${MODEL_DIR}'")
fi
for b in ${GIN_BINDINGS[@]+"${GIN_BINDINGS[@]}"}; do
  py_args+=("--gin.${b}")
done

# ---------------------------------------------------------------- cleanup on every exit
TMP_DIR=""
CHILD=""          # the gcloud command being waited for
WATCH_PID=""      # the process group following the run's logs
QR_PENDING=0      # a queued request of ours that is not ACTIVE with a READY slice yet
VM_PENDING=0      # a slice this invocation is creating that is not READY yet
SLICE_USED=0      # the slice exists and this invocation used it

stop_child() {
  if [[ -n "${WATCH_PID}" ]]; then
    kill -TERM -- "-${WATCH_PID}" 2>/dev/null || kill -TERM "${WATCH_PID}" 2>/dev/null || true
    WATCH_PID=""
  fi
  if [[ -n "${CHILD}" ]]; then
    kill -TERM "${CHILD}" 2>/dev/null || true
    wait "${CHILD}" 2>/dev/null || true
    CHILD=""
  fi
}

on_exit() {
  local rc=$?
  trap - EXIT
  trap 'echo "tpu_run.sh: cleanup interrupted; check with: launch/tpu_run.sh status --name ${NAME} --zone ${ZONE}" >&2; exit 130' INT TERM
  stop_child
  if [[ "${DRY_RUN}" == 0 && "${COMMAND}" == run && "${STAGE}" != compile_check ]]; then
    if [[ "${QR_PENDING}" == 1 || "${VM_PENDING}" == 1 ]]; then
      log "the slice ${NAME} was requested but never became usable: deleting the request"
      delete_slice || log "delete failed: delete it by hand (launch/tpu_run.sh delete ...)"
    elif [[ "${DELETE}" == 1 && "${SLICE_USED}" == 1 ]]; then
      log "--delete: deleting ${NAME}"
      delete_slice || log "delete failed: delete it by hand (launch/tpu_run.sh delete ...)"
    elif [[ "${SLICE_USED}" == 1 ]]; then
      log "the slice ${NAME} is kept and bills until deleted:" \
        "launch/tpu_run.sh delete --name ${NAME} --zone ${ZONE}$([[ "${QUEUED}" == 1 ]] && echo ' --queued')"
    fi
  fi
  [[ -z "${TMP_DIR}" ]] || rm -rf "${TMP_DIR}"
  exit "${rc}"
}
# Installed before any gcloud call: Ctrl-C, a timeout or an error anywhere runs on_exit.
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tpu_run.XXXXXX")"

# Runs a command in the background and waits for it, so that a signal is handled at once.
interruptible() {
  "$@" &
  CHILD=$!
  local rc=0
  wait "${CHILD}" || rc=$?
  CHILD=""
  return "${rc}"
}

# Runs a command for at most $1 seconds (GNU timeout; gtimeout on macOS; else unbounded).
# In the foreground: gcloud may ask a question on the terminal (the first ssh key).
with_timeout() {
  local secs="$1"
  shift
  if command -v timeout >/dev/null 2>&1; then
    timeout --foreground -k 10 "${secs}" "$@"
  elif command -v gtimeout >/dev/null 2>&1; then
    gtimeout --foreground -k 10 "${secs}" "$@"
  else
    "$@"
  fi
}

# Runs a gcloud command: stdout in OUT, stderr in ERR; returns its status.
OUT=""
ERR=""
capture() {
  local rc=0
  interruptible "$@" >"${TMP_DIR}/out" 2>"${TMP_DIR}/err" || rc=$?
  OUT="$(<"${TMP_DIR}/out")"
  ERR="$(<"${TMP_DIR}/err")"
  return "${rc}"
}

# Whether gcloud's error will not go away by retrying (auth, permissions, bad arguments).
is_permanent() {
  [[ "$1" == *auth* || "$1" == *PERMISSION_DENIED* || "$1" == *UNAUTHENTICATED* \
     || "$1" == *INVALID_ARGUMENT* || "$1" == *credential* ]]
}

# Whether gcloud's error says the resource does not exist.
is_not_found() {
  [[ "$1" == *NOT_FOUND* || "$1" == *"not found"* || "$1" == *"was not found"* ]]
}

# Sets TPU_STATE (READY, PREEMPTED, ..., or MISSING) and TPU_TYPE. gcloud errors (auth,
# permission, network) are retried twice, then shown and fatal.
TPU_STATE=""
TPU_TYPE=""
describe_tpu() {
  local tries=0
  while :; do
    if capture gcloud compute tpus tpu-vm describe "${NAME}" "${gcloud_scope[@]}" \
        --format='value(state,acceleratorType)'; then
      read -r TPU_STATE TPU_TYPE <<<"${OUT}" || true
      TPU_STATE="${TPU_STATE:-UNKNOWN}"
      TPU_TYPE="${TPU_TYPE##*/}"
      return 0
    fi
    if is_not_found "${ERR}"; then
      TPU_STATE=MISSING
      TPU_TYPE=""
      return 0
    fi
    tries=$((tries + 1))
    if ((tries >= 3)) || is_permanent "${ERR}"; then
      echo "${ERR}" >&2
      fatal "gcloud compute tpus tpu-vm describe ${NAME} failed (above); fix gcloud (auth, project, network) and rerun"
    fi
    log "describe failed (${ERR##*$'\n'}); retrying"
    interruptible sleep 5
  done
}

# Sets QR_STATE (ACTIVE, WAITING_FOR_RESOURCES, ..., or MISSING); errors as describe_tpu.
QR_STATE=""
describe_qr() {
  local tries=0
  while :; do
    if capture gcloud compute tpus queued-resources describe "${NAME}" "${gcloud_scope[@]}" \
        --format='value(state.state)'; then
      QR_STATE="${OUT:-UNKNOWN}"
      return 0
    fi
    if is_not_found "${ERR}"; then
      QR_STATE=MISSING
      return 0
    fi
    tries=$((tries + 1))
    if ((tries >= 3)) || is_permanent "${ERR}"; then
      echo "${ERR}" >&2
      fatal "gcloud compute tpus queued-resources describe ${NAME} failed (above); fix gcloud (auth, project, network) and rerun"
    fi
    log "describe failed (${ERR##*$'\n'}); retrying"
    interruptible sleep 5
  done
}

delete_slice() {
  local cmd
  if [[ "${QUEUED}" == 1 ]]; then
    cmd=(gcloud compute tpus queued-resources delete "${NAME}" "${gcloud_scope[@]}" --force --quiet)
  else
    cmd=(gcloud compute tpus tpu-vm delete "${NAME}" "${gcloud_scope[@]}" --quiet)
  fi
  show "$(shjoin "${cmd[@]}")"
  [[ "${DRY_RUN}" == 0 ]] || return 0
  if capture "${cmd[@]}"; then
    QR_PENDING=0
    VM_PENDING=0
    SLICE_USED=0
    return 0
  fi
  if is_not_found "${ERR}"; then
    QR_PENDING=0
    VM_PENDING=0
    return 0
  fi
  echo "${ERR}" >&2
  return 1
}

sleep_poll() { interruptible sleep "${POLL}"; }

create_slice() {
  local cap=() cmd
  if [[ "${QUEUED}" == 1 ]]; then
    if [[ "${SPOT}" == 1 || "${PREEMPTIBLE}" == 1 ]]; then cap=(--spot); fi
    cmd=(gcloud compute tpus queued-resources create "${NAME}" --node-id "${NAME}"
         "${gcloud_scope[@]}" --accelerator-type "${ACCEL}" --runtime-version "${RUNTIME}"
         ${cap[@]+"${cap[@]}"} --valid-until-duration "${QUEUE_TIMEOUT}s"
         ${create_flags[@]+"${create_flags[@]}"})
    QR_PENDING=1
  else
    if [[ "${SPOT}" == 1 ]]; then cap=(--spot); elif [[ "${PREEMPTIBLE}" == 1 ]]; then cap=(--preemptible); fi
    cmd=(gcloud compute tpus tpu-vm create "${NAME}" "${gcloud_scope[@]}"
         --accelerator-type "${ACCEL}" --version "${RUNTIME}" ${cap[@]+"${cap[@]}"}
         ${create_flags[@]+"${create_flags[@]}"})
    VM_PENDING=1
  fi
  show "$(shjoin "${cmd[@]}")"
  [[ "${DRY_RUN}" == 0 ]] || return 0
  # A create that is cut short (timeout, Ctrl-C) may still make the slice: on_exit deletes it.
  if ! interruptible with_timeout "${READY_TIMEOUT}" "${cmd[@]}"; then
    fatal "could not create ${NAME} (gcloud's error above)"
  fi
  SLICE_FRESH=1
}

# Waits until the queued resource is ACTIVE: at most QUEUE_TIMEOUT, then it is deleted.
wait_queued() {
  local start=${SECONDS}
  while :; do
    describe_qr
    case "${QR_STATE}" in
      ACTIVE) log "queued resource ${NAME} is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED|SUSPENDING)
        fatal "queued resource ${NAME} is ${QR_STATE} (gcloud compute tpus queued-resources describe ${NAME} --zone ${ZONE}); deleting it" ;;
      MISSING) QR_PENDING=0; fatal "queued resource ${NAME} disappeared while waiting for it" ;;
    esac
    if ((SECONDS - start >= QUEUE_TIMEOUT)); then
      fatal "queued resource ${NAME} not ACTIVE after ${QUEUE_TIMEOUT} s (state ${QR_STATE}); deleting the request"
    fi
    log "queued resource ${NAME}: ${QR_STATE}; waiting (at most $((QUEUE_TIMEOUT - SECONDS + start)) s more)"
    sleep_poll
  done
}

# Waits until the slice is READY: at most READY_TIMEOUT. Returns PREEMPTED if the slice is
# preempted, stopped or gone.
wait_ready() {
  local start=${SECONDS}
  while :; do
    describe_tpu
    case "${TPU_STATE}" in
      READY) return 0 ;;
      PREEMPTED|TERMINATED|STOPPED|STOPPING|FAILED|MISSING|DELETING)
        log "TPU VM ${NAME} is ${TPU_STATE} while waiting for READY"
        return "${PREEMPTED}" ;;
    esac
    if ((SECONDS - start >= READY_TIMEOUT)); then
      fatal "TPU VM ${NAME} not READY after ${READY_TIMEOUT} s (state ${TPU_STATE})"
    fi
    log "TPU VM ${NAME}: ${TPU_STATE}; waiting for READY"
    sleep_poll
  done
}

# Creates or reuses the slice until it is READY. Returns 0, or PREEMPTED when it was lost
# while waiting (the caller may retry). Sets SLICE_FRESH=1 if it made a new slice.
ensure_slice() {
  SLICE_FRESH=0
  if [[ "${DRY_RUN}" == 1 ]]; then
    if [[ "${QUEUED}" == 1 ]]; then
      show "$(shjoin gcloud compute tpus queued-resources describe "${NAME}" "${gcloud_scope[@]}" \
        --format='value(state.state)')  # reuse if ACTIVE; a SUSPENDED or FAILED one is deleted and requested again"
      create_slice
      show "$(shjoin gcloud compute tpus queued-resources describe "${NAME}" "${gcloud_scope[@]}" \
        --format='value(state.state)')  # every ${POLL} s until ACTIVE, at most ${QUEUE_TIMEOUT} s; then, or on Ctrl-C, the request is deleted"
      show "$(shjoin gcloud compute tpus tpu-vm describe "${NAME}" "${gcloud_scope[@]}" \
        --format='value(state,acceleratorType)')  # every ${POLL} s until READY, at most ${READY_TIMEOUT} s; stops on PREEMPTED or missing"
    else
      show "$(shjoin gcloud compute tpus tpu-vm describe "${NAME}" "${gcloud_scope[@]}" \
        --format='value(state,acceleratorType)')  # reuse if READY; a PREEMPTED one is deleted and created again"
      create_slice
      show "# $(shjoin gcloud compute tpus tpu-vm describe "${NAME}" "${gcloud_scope[@]}" \
        --format='value(state,acceleratorType)') every ${POLL} s while CREATING, at most ${READY_TIMEOUT} s"
    fi
    return 0
  fi
  local rounds=0 rc
  while ((rounds < 3)); do
    rounds=$((rounds + 1))
    if [[ "${QUEUED}" == 1 ]]; then
      describe_qr
      case "${QR_STATE}" in
        MISSING)
          log "requesting queued resource ${NAME} (${ACCEL}, ${RUNTIME}), valid for ${QUEUE_TIMEOUT} s"
          create_slice
          wait_queued ;;
        ACTIVE) ;;
        SUSPENDED|SUSPENDING|FAILED)
          log "queued resource ${NAME} is ${QR_STATE}; deleting it and requesting it again"
          delete_slice || fatal "could not delete queued resource ${NAME}"
          create_slice
          wait_queued ;;
        DELETING) log "queued resource ${NAME} is being deleted"; sleep_poll; continue ;;
        *)
          log "queued resource ${NAME} is ${QR_STATE}; waiting for it"
          QR_PENDING=1
          wait_queued ;;
      esac
      rc=0
      wait_ready || rc=$?
      if [[ "${rc}" == 0 ]]; then
        :
      elif [[ "${SLICE_FRESH}" == 1 ]]; then
        return "${PREEMPTED}"
      else
        log "queued resource ${NAME} is ACTIVE but its TPU VM is ${TPU_STATE}; requesting it again"
        delete_slice || fatal "could not delete queued resource ${NAME}"
        continue
      fi
    else
      describe_tpu
      case "${TPU_STATE}" in
        READY) ;;
        MISSING)
          log "creating TPU VM ${NAME} (${ACCEL}, ${RUNTIME})"
          create_slice ;;
        PREEMPTED|TERMINATED|FAILED|STOPPED)
          log "TPU VM ${NAME} is ${TPU_STATE}; deleting and recreating it"
          delete_slice || fatal "could not delete TPU VM ${NAME}"
          create_slice ;;
        CREATING|STARTING|RESTARTING|REPAIRING) log "TPU VM ${NAME} is ${TPU_STATE}" ;;
        *) fatal "TPU VM ${NAME} is ${TPU_STATE}; not touching it" ;;
      esac
      wait_ready || return "${PREEMPTED}"
    fi
    if [[ -n "${TPU_TYPE}" && "${TPU_TYPE}" != "${ACCEL}" ]]; then
      fatal "TPU VM ${NAME} exists as ${TPU_TYPE}, not ${ACCEL}: use another --name, or delete it"
    fi
    QR_PENDING=0
    VM_PENDING=0
    SLICE_USED=1
    log "TPU VM ${NAME} is READY (${ACCEL}, ${HOSTS} worker(s))"
    return 0
  done
  fatal "could not get a READY TPU VM ${NAME}"
}

# ---------------------------------------------------------------- workers
# The workers' output: log lines, exit and status reports (launch/tpu_worker.sh).
readonly RE_LINE='^\[w([0-9A-Za-z_.-]+)\] ?(.*)$'
readonly RE_EXIT='^@@DOREMI_EXIT worker=([^ ]+) rc=([0-9]+).*preempted=([01])'
readonly RE_STATUS='worker=([^ ]+) run=([^ ]+) state=([^ ]+) rc=([^ ]+) step=([^ ]+) log_age_s=([^ ]+) tpu_pids=([^ ]+)'
# launch/tpu_worker.sh, packed into one word for every ssh command (a dry run shows the
# placeholder <tpu_worker.sh>).
if [[ "${DRY_RUN}" == 1 ]]; then
  WORKER_B64='<tpu_worker.sh>'
else
  WORKER_B64="$(gzip -n -c "${SCRIPT_DIR}/tpu_worker.sh" | base64 | tr -d '\n')"
fi
readonly WORKER_B64

# The remote command that runs `tpu_worker.sh ARGS...` on a worker.
worker_cmd() {
  # shellcheck disable=SC2016  # $(...) runs on the worker.
  printf 'bash -c "$(echo %s | base64 -d | gunzip)" tpu_worker %s' "${WORKER_B64}" "$(shjoin "$@")"
}

ssh_cmd() {  # ssh_cmd WORKER REMOTE_COMMAND: the gcloud ssh command as words, in SSH
  SSH=(gcloud compute tpus tpu-vm ssh "${NAME}" "${gcloud_scope[@]}" "--worker=$1"
       ${ssh_flags[@]+"${ssh_flags[@]}"} --command "$2")
}

# Runs a remote command on all workers (at most $2 seconds, default 600); shows its output
# on stderr, leaves stdout in OUT. Returns gcloud's status.
ssh_all() {
  local secs="${2:-600}" rc=0
  ssh_cmd all "$1"
  show "$(shjoin "${SSH[@]}")"
  [[ "${DRY_RUN}" == 0 ]] || return 0
  with_timeout "${secs}" "${SSH[@]}" >"${TMP_DIR}/ssh_out" || rc=$?
  OUT="$(<"${TMP_DIR}/ssh_out")"
  grep -v '^@@DOREMI' "${TMP_DIR}/ssh_out" >&2 || true
  return "${rc}"
}

# After a failed ssh: PREEMPTED if the slice is gone, else fatal.
ssh_failed() {
  describe_tpu
  if [[ "${TPU_STATE}" != READY ]]; then
    log "TPU VM ${NAME} is ${TPU_STATE}"
    return "${PREEMPTED}"
  fi
  fatal "$1 failed on ${NAME} (gcloud's output above)"
}

# Multi-worker slices: gcloud's ssh and scp to --worker=all need the key in ssh-agent.
check_ssh_agent() {
  [[ "${HOSTS}" -gt 1 && "${SSH_AGENT_CHECK}" == 1 && "${DRY_RUN}" == 0 ]] || return 0
  local key="${TPU_RUN_SSH_KEY:-${HOME}/.ssh/google_compute_engine}" keys rc=0 fp
  local fix="eval \"\$(ssh-agent -s)\" && ssh-add ${key}"
  if [[ ! -f "${key}" ]]; then
    fatal "${ACCEL} has ${HOSTS} workers: gcloud's ssh to all of them needs its key ${key} in
  ssh-agent, and there is no such key yet. Create it (ssh-keygen -t rsa -f ${key} -C \"\$USER\"),
  then: ${fix}" 2
  fi
  keys="$(ssh-add -l 2>&1)" || rc=$?
  if [[ "${rc}" == 2 ]]; then
    fatal "${ACCEL} has ${HOSTS} workers: gcloud's ssh to all of them needs ssh-agent, and none is running. Fix: ${fix} (or --no-ssh-agent-check)" 2
  fi
  fp="$(ssh-keygen -l -f "${key}" 2>/dev/null | awk '{print $2}')"
  if [[ -z "${fp}" || "${keys}" != *"${fp}"* ]]; then
    fatal "${ACCEL} has ${HOSTS} workers: gcloud's ssh to all of them needs ${key} in ssh-agent, and it is not loaded. Fix: ${fix} (or --no-ssh-agent-check)" 2
  fi
}

make_tarball() {
  local tarball="$1" log_rel=""
  # Local logs never travel to the workers, wherever --log-dir is.
  if [[ -d "${LOG_DIR}" ]]; then
    log_rel="$(cd "${LOG_DIR}" && pwd)"
    log_rel="${log_rel#"${REPO_ROOT}"/}"
  fi
  if git -C "${REPO_ROOT}" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # shellcheck disable=SC2016  # $f and $1 expand in the inner sh.
    (cd "${REPO_ROOT}" && git ls-files -z --cached --others --exclude-standard \
      | xargs -0 -r sh -c 'skip="$1"; shift; for f; do
          case "$f" in tpu_logs/*|"$skip"/*) continue ;; esac
          [ -e "$f" ] && printf "%s\0" "$f"; done' _ "${log_rel}" \
      | tar -czf "${tarball}" --null -T -)
  else
    tar -czf "${tarball}" -C "${REPO_ROOT}" --exclude=.git --exclude=.venv \
      --exclude=__pycache__ --exclude=tpu_logs --exclude="${log_rel}" .
  fi
  log "packed working tree: ${tarball} ($(du -h "${tarball}" | cut -f1))"
}

install_code() {
  local fetch
  if [[ -n "${REPO_URL}" ]]; then
    fetch="rm -rf ${REMOTE_DIR} && $(shjoin_remote git clone --quiet "${REPO_URL}" "${REMOTE_DIR}")"
    fetch+=" && $(shjoin_remote git -C "${REMOTE_DIR}" checkout --quiet "${REF}")"
  else
    local tarball="${TMP_DIR:-/tmp}/doremi_jax_src_${NAME}.tar.gz" scp
    if [[ "${DRY_RUN}" == 1 ]]; then
      tarball="${TMPDIR:-/tmp}/doremi_jax_src_${NAME}.tar.gz"
      show "tar -czf $(shquote "${tarball}") -C $(shquote "${REPO_ROOT}") --null -T -  # git ls-files --cached --others --exclude-standard, without tpu_logs/"
    else
      make_tarball "${tarball}"
    fi
    scp=(gcloud compute tpus tpu-vm scp "${tarball}" "${NAME}:${REMOTE_TARBALL#~/}"
         "${gcloud_scope[@]}" --worker=all ${ssh_flags[@]+"${ssh_flags[@]}"})
    show "$(shjoin "${scp[@]}")"
    if [[ "${DRY_RUN}" == 0 ]]; then
      with_timeout 1800 "${scp[@]}" || { ssh_failed "copying the code"; return $?; }
    fi
    fetch="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf ${REMOTE_TARBALL} -C ${REMOTE_DIR}"
  fi
  local pin=""
  if [[ -n "${JAX_VERSION}" && "${JAX_VERSION}" != none ]]; then
    pin=" $(shquote "jax[tpu]==${JAX_VERSION}")"
  fi
  # TPU VM images ship Python 3.10; uv provides the Python the project needs.
  local setup="set -e; ${fetch}"
  setup+=" && { [ -x ~/.local/bin/uv ] || python3 -m pip install --quiet --user uv"
  setup+=" || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
  setup+=" && ~/.local/bin/uv venv --quiet --allow-existing --python $(shquote "${PYVER}") ${REMOTE_VENV}"
  setup+=" && cd ${REMOTE_DIR} && VIRTUAL_ENV=${REMOTE_VENV} ~/.local/bin/uv pip install --quiet -e '.[tpu]'${pin}"
  ssh_all "${setup}" 1800 || { ssh_failed "installing the code"; return $?; }
}

# The command each worker runs, detached: cd, environment, python.
remote_run_cmd() {
  local envs="" e
  if [[ -n "${COMPILATION_CACHE}" ]]; then
    envs+="export $(shquote "JAX_COMPILATION_CACHE_DIR=${COMPILATION_CACHE}") && "
  fi
  for e in ${ENVS[@]+"${ENVS[@]}"}; do
    envs+="export $(shquote "${e}") && "
  done
  printf '%s' "cd ${REMOTE_DIR} && ${envs}exec ${REMOTE_VENV}/bin/python $(shjoin "${py_args[@]}")"
}

# Stops stale processes holding the TPU on every worker. A run of ours that is still
# running is stopped with --restart, else this refuses.
preflight() {
  ssh_all "$(worker_cmd preflight)" 300 || { ssh_failed "the pre-run check"; return $?; }
  [[ "${DRY_RUN}" == 0 ]] || return 0
  local alive
  alive="$(grep '^@@DOREMI_ALIVE' <<<"${OUT}" || true)"
  if [[ -n "${alive}" ]]; then
    if [[ "${RESTART}" == 0 ]]; then
      echo "${alive}" >&2
      fatal "a run is still running on ${NAME} (above); it is detached. Follow it:
  launch/tpu_run.sh attach --name ${NAME} --zone ${ZONE}; check it: status; stop it: kill;
  or start anew with --restart (stops it first)" 1
    fi
    log "--restart: stopping the running run first"
    kill_run || return $?
    ssh_all "$(worker_cmd preflight)" 300 || { ssh_failed "the pre-run check"; return $?; }
  fi
}

kill_run() {
  ssh_all "$(worker_cmd kill "${KILL_GRACE}")" $((KILL_GRACE + 300)) \
    || { ssh_failed "stopping the run"; return $?; }
}

start_run() {
  local gs=""
  if [[ "${OUT_DIR}" == gs://* ]]; then
    gs="${OUT_DIR%/}/tpu_logs/${RUN_ID}"
  fi
  ssh_all "$(worker_cmd start "${RUN_ID}" "${gs}" "$(remote_run_cmd)")" 300 \
    || { ssh_failed "starting the run"; return $?; }
  [[ "${DRY_RUN}" == 0 ]] || return 0
  local n
  n="$(grep -c '^@@DOREMI_STARTED' <<<"${OUT}" || true)"
  if [[ "${n}" -lt "${HOSTS}" ]]; then
    log "the run started on ${n} of ${HOSTS} workers; stopping it"
    kill_run || true
    fatal "could not start the run on every worker"
  fi
  log "run ${RUN_ID} started on ${HOSTS} worker(s)${gs:+; logs also in ${gs}/}"
}

# Whether the slice still looks READY (a failed describe counts as yes: no verdict).
slice_ok() {
  if capture gcloud compute tpus tpu-vm describe "${NAME}" "${gcloud_scope[@]}" \
      --format='value(state,acceleratorType)'; then
    [[ "${OUT%%[[:space:]]*}" == READY ]]
  elif is_not_found "${ERR}"; then
    return 1
  fi
}

# Follows the run on every worker: prints and keeps each worker's log, and returns 0 when
# every worker's process exited 0, PREEMPTED when the slice went away or the trainer stopped
# for a preemption, or the status of the first worker that failed (after stopping the
# others: fail-fast). A dropped connection is resumed where it stopped.
monitor() {
  local dir="${LOG_DIR}/${NAME}/${1:-${RUN_ID}}"
  mkdir -p "${dir}"
  local -A off=() rc=() pre=()
  local fd line partial="" w r p offsets n last_check reconnects=0 got
  while :; do
    offsets=""
    for w in "${!off[@]}"; do offsets+="${offsets:+,}${w}:${off[${w}]}"; done
    ssh_cmd all "$(worker_cmd watch "${RUN_ID}" "${offsets:-none}")"
    show "$(shjoin "${SSH[@]}")"
    # Its own process group (setsid), so that stopping it stops its ssh processes too.
    if command -v setsid >/dev/null 2>&1; then
      exec {fd}< <(exec setsid "${SSH[@]}" 2>&1 </dev/null)
    else
      exec {fd}< <(exec "${SSH[@]}" 2>&1 </dev/null)
    fi
    WATCH_PID=$!
    last_check=${SECONDS}
    got=0
    while :; do
      line=""
      if IFS= read -r -t "${POLL}" -u "${fd}" line; then
        line="${partial}${line}"
        partial=""
      else
        r=$?
        if ((r > 128)); then  # no output for POLL seconds: is the slice still there?
          partial+="${line}"
          if ((SECONDS - last_check >= 1)); then
            last_check=${SECONDS}
            if ! slice_ok; then
              stop_child
              log "TPU VM ${NAME} is no longer READY: preempted"
              return "${PREEMPTED}"
            fi
          fi
          continue
        fi
        line="${partial}${line}"
        partial=""
        [[ -n "${line}" ]] || break  # end of output
      fi
      if [[ "${line}" =~ ${RE_EXIT} ]]; then
        w="${BASH_REMATCH[1]}"; r="${BASH_REMATCH[2]}"; p="${BASH_REMATCH[3]}"
        rc[${w}]="${r}"
        pre[${w}]="${p}"
        if [[ "${r}" != 0 ]]; then
          stop_child
          if ! slice_ok; then
            log "worker ${w} exited with status ${r} and ${NAME} is no longer READY: preempted"
            return "${PREEMPTED}"
          fi
          log "worker ${w} exited with status ${r}: stopping the run on every worker (fail-fast)"
          tail -n 20 "${dir}/worker-${w}.log" 2>/dev/null | sed "s/^/[tpu_run] worker ${w}: /" >&2 || true
          kill_run || true
          echo "tpu_run.sh: worker ${w} failed with exit status ${r}; its log: ${dir}/worker-${w}.log" >&2
          return "${r}"
        fi
        log "worker ${w} finished (exit status 0)"
        if [[ "${#rc[@]}" -ge "${HOSTS}" ]]; then
          stop_child
          for p in "${pre[@]}"; do
            if [[ "${p}" == 1 ]]; then
              log "the run stopped for a preemption (checkpoint saved)"
              return "${PREEMPTED}"
            fi
          done
          log "run ${RUN_ID} finished on every worker; logs: ${dir}/"
          return 0
        fi
      elif [[ "${line}" =~ ${RE_LINE} ]]; then
        w="${BASH_REMATCH[1]}"
        printf '%s\n' "${BASH_REMATCH[2]}" >>"${dir}/worker-${w}.log"
        off[${w}]=$(( ${off[${w}]:-0} + 1 ))
        printf '%s\n' "${line}"
        got=1
      elif [[ "${line}" != @@DOREMI* ]]; then
        printf '%s\n' "${line}" >&2  # gcloud's own messages
      fi
    done
    exec {fd}<&-
    stop_child
    # The connection ended before every worker reported: ask them, then follow again.
    log "lost the connection to some workers; checking the run"
    if ! ssh_all "$(worker_cmd status)" 300; then
      if ! slice_ok; then return "${PREEMPTED}"; fi
    else
      while read -r line; do
        if [[ "${line}" =~ ${RE_STATUS} && "${BASH_REMATCH[3]}" == exited ]]; then
          w="${BASH_REMATCH[1]}"
          r="${BASH_REMATCH[4]}"
          [[ "${r}" =~ ^[0-9]+$ ]] || r=137  # killed without an exit status
          [[ -n "${rc[${w}]:-}" ]] || { rc[${w}]="${r}"; pre[${w}]=0; }
          [[ "${line}" != *preempted=1* ]] || pre[${w}]=1
        fi
      done < <(grep '^@@DOREMI_STATUS' <<<"${OUT}" || true)
      for w in "${!rc[@]}"; do
        if [[ "${rc[${w}]}" != 0 ]]; then
          if ! slice_ok; then return "${PREEMPTED}"; fi
          log "worker ${w} exited with status ${rc[${w}]}: stopping the run on every worker (fail-fast)"
          kill_run || true
          echo "tpu_run.sh: worker ${w} failed with exit status ${rc[${w}]}" >&2
          return "${rc[${w}]}"
        fi
      done
      n="${#rc[@]}"
      if [[ "${n}" -ge "${HOSTS}" ]]; then
        for p in "${pre[@]}"; do [[ "${p}" != 1 ]] || return "${PREEMPTED}"; done
        return 0
      fi
    fi
    if ! slice_ok; then return "${PREEMPTED}"; fi
    if [[ "${got}" == 1 ]]; then reconnects=0; else reconnects=$((reconnects + 1)); fi
    if ((reconnects > 10)); then
      fatal "lost contact with the workers of ${NAME} ten times in a row; the run goes on detached: launch/tpu_run.sh status|attach|kill --name ${NAME} --zone ${ZONE}"
    fi
    sleep_poll
  done
}

# ---------------------------------------------------------------- commands
cmd_run() {
  local attempt=0 rc
  check_ssh_agent
  while :; do
    RUN_ID="${STAGE}-$(date +%Y%m%d-%H%M%S)-$$"
    ((attempt == 0)) || RUN_ID+="-retry${attempt}"
    rc=0
    run_attempt || rc=$?
    if [[ "${rc}" != "${PREEMPTED}" ]]; then
      return "${rc}"
    fi
    if ((attempt >= RETRIES)); then
      fatal "${NAME} was preempted and no retries are left (--retries ${RETRIES}); rerun the same command to resume from ${OUT_DIR:-MODEL_DIR}'s checkpoint"
    fi
    attempt=$((attempt + 1))
    log "preempted: retry ${attempt} of ${RETRIES} (recreate or wait for the slice, run again, resume from the checkpoint)"
  done
}

run_attempt() {
  ensure_slice || return $?
  preflight || return $?
  if [[ "${SKIP_INSTALL}" == 0 || "${SLICE_FRESH}" == 1 ]]; then
    install_code || return $?
  fi
  start_run || return $?
  if [[ "${DRY_RUN}" == 1 ]]; then
    ssh_cmd all "$(worker_cmd watch "${RUN_ID}" none)"
    show "$(shjoin "${SSH[@]}")  # follow every worker; logs in ${LOG_DIR}/${NAME}/RUN/worker-N.log; fail-fast"
    if [[ "${RETRIES}" -gt 0 ]]; then
      show "# on preemption, up to ${RETRIES} time(s): back to the slice check above, then run again (resuming from ${OUT_DIR:-MODEL_DIR})"
    fi
    return 0
  fi
  monitor
}

cmd_status() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    show "$(shjoin gcloud compute tpus tpu-vm describe "${NAME}" "${gcloud_scope[@]}" \
      --format='value(state,acceleratorType)')"
    if [[ "${QUEUED}" == 1 ]]; then
      show "$(shjoin gcloud compute tpus queued-resources describe "${NAME}" "${gcloud_scope[@]}" \
        --format='value(state.state)')"
    fi
    ssh_all "$(worker_cmd status)"
    return 0
  fi
  describe_tpu
  local qr=""
  if [[ "${QUEUED}" == 1 ]]; then
    describe_qr
    qr="; queued resource: ${QR_STATE}"
  fi
  [[ -z "${TPU_TYPE}" ]] || { ACCEL="${TPU_TYPE}"; HOSTS="$(hosts_of "${ACCEL}")"; }
  echo "slice ${NAME} (${TPU_TYPE:-?}, ${HOSTS} worker(s)): ${TPU_STATE}${qr}"
  [[ "${TPU_STATE}" == READY ]] || return 0
  check_ssh_agent
  ssh_all "$(worker_cmd status)" 300 || fatal "could not reach the workers of ${NAME}"
  local line w run state rc step age pids
  while read -r line; do
    [[ "${line}" =~ ${RE_STATUS} ]] || continue
    w="${BASH_REMATCH[1]}"; run="${BASH_REMATCH[2]}"; state="${BASH_REMATCH[3]}"
    rc="${BASH_REMATCH[4]}"; step="${BASH_REMATCH[5]}"; age="${BASH_REMATCH[6]}"; pids="${BASH_REMATCH[7]}"
    case "${state}" in
      running) state="running" ;;
      exited) state="exited (status ${rc})" ;;
      none) state="no run" ;;
    esac
    printf 'worker %s: %-20s run %s, last step %s, log updated %s s ago%s\n' "${w}" "${state}" \
      "${run}" "${step}" "${age}" "$([[ "${pids}" == - ]] || echo ", TPU held by pid(s) ${pids}")"
  done < <(grep '^@@DOREMI_STATUS' <<<"${OUT}" | sort -t= -k2 -n || true)
}

cmd_logs() {
  local dir line
  dir="${LOG_DIR}/${NAME}/logs-$(date +%Y%m%d-%H%M%S)"
  ssh_cmd "${WORKER}" "$(worker_cmd logs "${RUN_ARG}" "${LINES}" "${FOLLOW}")"
  show "$(shjoin "${SSH[@]}")"
  [[ "${DRY_RUN}" == 0 ]] || return 0
  mkdir -p "${dir}"
  # Each worker's lines also go to DIR/worker-N.log (like gcloud's --output-directory).
  while IFS= read -r line; do
    printf '%s\n' "${line}"
    if [[ "${line}" =~ ${RE_LINE} ]]; then
      printf '%s\n' "${BASH_REMATCH[2]}" >>"${dir}/worker-${BASH_REMATCH[1]}.log"
    fi
  done < <(interruptible "${SSH[@]}" 2>&1)
  log "saved per worker under ${dir}/"
}

cmd_kill() {
  kill_run || fatal "could not reach the workers of ${NAME}"
  [[ "${DRY_RUN}" == 0 ]] || return 0
  grep '^@@DOREMI_KILLED' <<<"${OUT}" | sed 's/^@@DOREMI_KILLED /[tpu_run] /' >&2 || true
}

cmd_attach() {
  if [[ "${DRY_RUN}" == 0 ]]; then
    describe_tpu
    [[ "${TPU_STATE}" == READY ]] || fatal "TPU VM ${NAME} is ${TPU_STATE}"
    ACCEL="${TPU_TYPE}"
    HOSTS="$(hosts_of "${ACCEL}")"
    check_ssh_agent
  fi
  RUN_ID="${RUN_ARG}"
  if [[ "${DRY_RUN}" == 1 ]]; then
    ssh_cmd all "$(worker_cmd watch "${RUN_ID}" none)"
    show "$(shjoin "${SSH[@]}")  # follow every worker; fail-fast"
    return 0
  fi
  local rc=0
  monitor "attach-$(date +%Y%m%d-%H%M%S)" || rc=$?
  if [[ "${rc}" == "${PREEMPTED}" ]]; then
    fatal "${NAME} was preempted; rerun the launch command (with --retries N) to resume"
  fi
  return "${rc}"
}

compile_check_locally() {
  local topo="${TOPOLOGY}"
  if [[ -z "${topo}" ]]; then
    topo="$(topology_for)" || die "no known topology for ${ACCEL}; pass --topology (e.g. v5e:4x4, v4:2x2x4)"
  fi
  local py="${PYTHON:-python3}"
  show "$(shjoin "${py}" "${py_args[@]}" "--topology=${topo}")"
  [[ "${DRY_RUN}" == 0 ]] || return 0
  "${py}" "${py_args[@]}" "--topology=${topo}"
}

# ---------------------------------------------------------------- main
if [[ "${COMMAND}" == run && "${STAGE}" == compile_check ]]; then
  cd "${REPO_ROOT}"
  compile_check_locally
  exit $?
fi
if [[ "${DRY_RUN}" == 0 ]]; then
  command -v gcloud >/dev/null 2>&1 \
    || fatal "gcloud not found; install the Google Cloud CLI (or use --dry-run)" 2
fi

case "${COMMAND}" in
  delete) delete_slice || fatal "could not delete ${NAME}" ;;
  status) cmd_status ;;
  logs) cmd_logs ;;
  kill) cmd_kill ;;
  attach) cmd_attach ;;
  run)
    rc=0
    cmd_run || rc=$?
    if [[ "${DRY_RUN}" == 1 && "${DELETE}" == 1 ]]; then
      show "# --delete: on every exit of the script"
      delete_slice
    fi
    exit "${rc}" ;;
esac
