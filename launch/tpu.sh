#!/usr/bin/env bash
# Launch vpt training on a Cloud TPU VM (one host or a multi-host pod slice).
#
#   launch/tpu.sh --name my-tpu --zone us-central2-b --accelerator-type v4-8 \
#       --config experiments/lm_ntp.py:tiny --workdir gs://bucket/run -- --config.num_steps=1000
#
# Subcommands: create | setup | train (default) | status | ssh | delete. `--help` lists every
# flag; launch/README.md explains the flow, preemption/auto-resume and teardown.
#
# The training command runs on every worker at once (`gcloud ... ssh --worker=all`) with
# VPT_MULTIHOST=1, so vpt calls jax.distributed.initialize(), which finds the other hosts of
# the slice by itself. vpt resumes from the newest checkpoint in --workdir, so re-running the
# same command after a preemption continues the run: that is all --max-restarts does.
#
# Written for bash >= 3.2 (macOS's /bin/bash too) and checked with shellcheck.
set -euo pipefail

# ----------------------------------------------------------------------------- defaults
# Every flag can also be given by the environment variable named in usage().
NAME="${TPU_NAME:-vpt-${USER:-tpu}}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v4-8}"
VERSION="${TPU_VERSION:-}"
QUEUED="${TPU_QUEUED:-0}"
SPOT="${TPU_SPOT:-0}"
PREEMPTIBLE="${TPU_PREEMPTIBLE:-0}"
REPO="${VPT_REPO:-}"
BRANCH="${VPT_BRANCH:-}"
CONFIG="${VPT_CONFIG:-}"
WORKDIR="${VPT_WORKDIR:-}"
MAX_RESTARTS="${TPU_MAX_RESTARTS:-0}"
TEARDOWN="${TPU_TEARDOWN:-0}"
DRY_RUN="${TPU_DRY_RUN:-0}"
SKIP_SETUP="${TPU_SKIP_SETUP:-0}"
WAIT_TIMEOUT="${TPU_WAIT_TIMEOUT:-3600}"
POLL_INTERVAL="${TPU_POLL_INTERVAL:-30}"
WORKER="${TPU_WORKER:-0}"
# Layout on the TPU VMs, relative to the remote $HOME.
REMOTE_DIR="${VPT_REMOTE_DIR:-vpt}"
REMOTE_VENV="${VPT_REMOTE_VENV:-vpt_venv}"
REMOTE_LOG_DIR="${VPT_REMOTE_LOG_DIR:-vpt_logs}"
# What `setup` pip-installs next to `-e .` (one requirement; setup.py's jax pin applies too).
JAX_REQUIREMENT="${VPT_JAX_REQUIREMENT:-jax[tpu]}"

COMMAND=""
EXTRA_ARGS=()   # after `--`: appended to `python -m vpt.main` (train) or run remotely (ssh)
ENV_VARS=()     # --env KEY=VALUE, set for the training process on every worker
LOC=()          # --zone=... --project=..., filled in by resolve_location
STATE=""        # output of node_state / qr_state
CREATED=0       # set by ensure_node when it (re)created the node
TEARDOWN_ARMED=0
TARBALL=""
ERR_FILE="${TMPDIR:-/tmp}/vpt-tpu.$$.err"

case "${BASH_SOURCE[0]}" in
  */*) SCRIPT_DIR="$(cd "${BASH_SOURCE[0]%/*}" && pwd)" ;;
  *) SCRIPT_DIR="$(pwd)" ;;
esac
DEFAULT_REPO="${SCRIPT_DIR%/*}"

usage() {
  local line
  while IFS= read -r line; do printf '%s\n' "$line"; done <<EOF
Usage: ${0##*/} [SUBCOMMAND] [FLAGS] [-- ARGS...]

Create a Cloud TPU VM, install vpt on every worker and train on all of them.

Subcommands (default: train):
  create    create the node (or queued resource) if missing and wait until it is READY
  setup     on every worker: copy/clone the repo, create a venv, pip install -e . and jax[tpu]
  train     create if missing + setup + run 'python -m vpt.main' on all workers (--worker=all)
            with VPT_MULTIHOST=1; ARGS after -- are appended to it (e.g. -- --config.num_steps=1000)
  status    print the state of the node (and of the queued resource)
  ssh       ssh into worker --worker (default 0); ARGS after -- are run there as a command
  delete    delete the node (with --queued: the queued resource and its node)

Flags (environment variable giving the default in brackets):
  --name NAME              TPU node name; also the queued-resource id [TPU_NAME, default vpt-\$USER]
  --zone ZONE              e.g. us-central2-b [TPU_ZONE, else gcloud config compute/zone]
  --project PROJECT        GCP project [TPU_PROJECT, else gcloud config core/project]
  --accelerator-type TYPE  e.g. v4-8, v5litepod-16, v5p-8, v6e-8 [TPU_ACCELERATOR_TYPE, default v4-8]
  --version VERSION        TPU runtime software version, e.g. tpu-ubuntu2204-base,
                           v2-alpha-tpuv5-lite [TPU_VERSION, default: picked from the TPU generation]
  --queued                 create through a queued resource (queued-resources create --node-id)
                           and wait until it is ACTIVE [TPU_QUEUED=1]
  --spot                   Spot capacity (may be preempted any time) [TPU_SPOT=1]
  --preemptible            legacy preemptible TPU (with --queued: same as --spot) [TPU_PREEMPTIBLE=1]
  --repo URL|PATH          git URL to clone, or local directory to copy to every worker with
                           'tpu-vm scp --worker=all' [VPT_REPO, default: this checkout]
  --branch BRANCH          branch or tag to clone (git URL only) [VPT_BRANCH, default: the remote HEAD]
  --config CONFIG          experiment config, e.g. experiments/lm_ntp.py:tiny (train) [VPT_CONFIG]
  --workdir DIR            checkpoints and logs, gs://bucket/run recommended (train) [VPT_WORKDIR]
  --env KEY=VALUE          extra environment variable for the training process (repeatable)
  --max-restarts N         re-run up to N times when the job exits non-zero or the node is
                           preempted; the node is recreated when needed [TPU_MAX_RESTARTS, default 0]
  --teardown               delete the node / queued resource when train ends, whatever the
                           outcome (also on Ctrl-C) [TPU_TEARDOWN=1]
  --skip-setup             train: do not (re)install on a node that already exists [TPU_SKIP_SETUP=1]
  --worker N|all           worker for 'ssh' [TPU_WORKER, default 0]
  --wait-timeout SECONDS   give up waiting for a state after this long [TPU_WAIT_TIMEOUT, default 3600]
  --poll-interval SECONDS  between state checks [TPU_POLL_INTERVAL, default 30]
  --dry-run                print every command (one per line, prefixed with '+ ') instead of
                           running it; does not call gcloud [TPU_DRY_RUN=1]
  -h, --help               show this help

Remote layout (under the worker's \$HOME): repo \$VPT_REMOTE_DIR (default vpt), venv
\$VPT_REMOTE_VENV (default vpt_venv), logs \$VPT_REMOTE_LOG_DIR/NAME-HOSTNAME.log (default
vpt_logs). \$VPT_JAX_REQUIREMENT (default 'jax[tpu]') is installed next to '-e .'.

Example:
  ${0##*/} --name my-tpu --zone us-central2-b --accelerator-type v4-16 --spot --max-restarts 5 \\
      --config experiments/lm_ntp.py:tiny --workdir gs://my-bucket/runs/ntp -- --config.num_steps=1000
EOF
}

# ----------------------------------------------------------------------------- helpers
log() { printf '[tpu.sh] %s\n' "$*" >&2; }
warn() { printf '[tpu.sh] WARNING: %s\n' "$*" >&2; }
die() {
  printf '[tpu.sh] ERROR: %s\n' "$*" >&2
  exit 2
}

# Quote one word for a POSIX shell, leaving plainly safe words as they are.
shquote() {
  local s="$1" safe='^[A-Za-z0-9_./:=@,+%-]+$' q="'\\''"
  if [[ "$s" =~ $safe ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# Quote one word for the remote command line, in double quotes so that the whole command
# still reads well once it is single-quoted as the --command argument.
rquote() {
  local s="$1" safe='^[A-Za-z0-9_./:=@,+%-]+$'
  if [[ "$s" =~ $safe ]]; then
    printf '%s' "$s"
  else
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    s="${s//\$/\\\$}"
    s="${s//\`/\\\`}"
    printf '"%s"' "$s"
  fi
}

# The command line, as one copy-pasteable line.
format_cmd() {
  local out="" word
  for word in "$@"; do
    out="${out:+$out }$(shquote "$word")"
  done
  printf '%s' "$out"
}

# Run a command; with --dry-run only print it (on stdout, prefixed with '+ ').
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(format_cmd "$@")"
    return 0
  fi
  printf '+ %s\n' "$(format_cmd "$@")" >&2
  "$@"
}

is_true() {
  case "$1" in
    1 | true | True | TRUE | yes | on) return 0 ;;
    *) return 1 ;;
  esac
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

is_local_repo() { [[ -d "$REPO" ]]; }

on_exit() {
  local rc=$?
  trap - EXIT
  if [[ "$TEARDOWN_ARMED" == 1 ]]; then
    TEARDOWN_ARMED=0
    log "teardown: deleting $NAME"
    (delete_node) || warn "teardown failed: check 'gcloud compute tpus tpu-vm list --zone=$ZONE' and delete $NAME by hand"
  fi
  local f
  for f in "$ERR_FILE" "$TARBALL"; do
    if [[ -n "$f" && -e "$f" ]]; then rm -f "$f" || true; fi
  done
  exit "$rc"
}

# ----------------------------------------------------------------------------- arguments
set_opt() {
  case "$1" in
    --name) NAME="$2" ;;
    --zone) ZONE="$2" ;;
    --project) PROJECT="$2" ;;
    --accelerator-type) ACCELERATOR_TYPE="$2" ;;
    --version) VERSION="$2" ;;
    --repo) REPO="$2" ;;
    --branch) BRANCH="$2" ;;
    --config) CONFIG="$2" ;;
    --workdir) WORKDIR="$2" ;;
    --env) ENV_VARS+=("$2") ;;
    --max-restarts) MAX_RESTARTS="$2" ;;
    --worker) WORKER="$2" ;;
    --wait-timeout) WAIT_TIMEOUT="$2" ;;
    --poll-interval) POLL_INTERVAL="$2" ;;
    *) die "unknown flag: $1 (see --help)" ;;
  esac
}

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h | --help)
        usage
        exit 0
        ;;
      create | setup | train | status | ssh | delete)
        [[ -z "$COMMAND" ]] || die "two subcommands given: $COMMAND and $1"
        COMMAND="$1"
        ;;
      --queued) QUEUED=1 ;;
      --spot) SPOT=1 ;;
      --preemptible) PREEMPTIBLE=1 ;;
      --teardown) TEARDOWN=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --skip-setup) SKIP_SETUP=1 ;;
      --name | --zone | --project | --accelerator-type | --version | --repo | --branch | \
        --config | --workdir | --env | --max-restarts | --worker | --wait-timeout | --poll-interval)
        if [[ $# -lt 2 || "$2" == --* ]]; then
          die "$1 needs a value"
        fi
        set_opt "$1" "$2"
        shift
        ;;
      --*=*) set_opt "${1%%=*}" "${1#*=}" ;;
      --)
        shift
        EXTRA_ARGS=("$@")
        break
        ;;
      *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
  done
  COMMAND="${COMMAND:-train}"
  local var
  for var in QUEUED SPOT PREEMPTIBLE TEARDOWN DRY_RUN SKIP_SETUP; do
    if is_true "${!var}"; then printf -v "$var" 1; else printf -v "$var" 0; fi
  done
  REPO="${REPO:-$DEFAULT_REPO}"
}

validate() {
  local name_re='^[a-z]([-a-z0-9]*[a-z0-9])?$' path_re='^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$'
  local env_re='^[A-Za-z_][A-Za-z0-9_]*=' kv
  [[ "$NAME" =~ $name_re ]] ||
    die "--name '$NAME' is not a valid TPU name (lowercase letters, digits and '-', starting with a letter)"
  is_uint "$MAX_RESTARTS" || die "--max-restarts needs a non-negative integer, got '$MAX_RESTARTS'"
  is_uint "$WAIT_TIMEOUT" || die "--wait-timeout needs a number of seconds, got '$WAIT_TIMEOUT'"
  is_uint "$POLL_INTERVAL" || die "--poll-interval needs a number of seconds, got '$POLL_INTERVAL'"
  [[ -n "$ACCELERATOR_TYPE" ]] || die "--accelerator-type must not be empty"
  if [[ "$SPOT" == 1 && "$PREEMPTIBLE" == 1 ]]; then
    die "--spot and --preemptible are exclusive (prefer --spot)"
  fi
  for kv in "$REMOTE_DIR" "$REMOTE_VENV" "$REMOTE_LOG_DIR"; do
    [[ "$kv" =~ $path_re ]] || die "remote path '$kv' must be a plain relative path"
  done
  for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
    [[ "$kv" =~ $env_re ]] || die "--env needs KEY=VALUE, got '$kv'"
  done
  if [[ ${#EXTRA_ARGS[@]} -gt 0 && "$COMMAND" != train && "$COMMAND" != ssh ]]; then
    die "arguments after -- are only for train and ssh"
  fi
  if [[ "$COMMAND" == train ]]; then
    [[ -n "$CONFIG" ]] || die "train needs --config (e.g. --config experiments/lm_ntp.py:tiny)"
    [[ -n "$WORKDIR" ]] || die "train needs --workdir (e.g. --workdir gs://BUCKET/runs/NAME)"
    if [[ "$WORKDIR" != gs://* ]]; then
      warn "--workdir '$WORKDIR' is not gs://: it lives on each worker's own disk, so a" \
        "multi-host run has no shared checkpoint and a recreated node starts from scratch"
    fi
  fi
  if [[ "$COMMAND" == train || "$COMMAND" == setup ]]; then
    if ! is_local_repo && [[ "$REPO" != *://* && "$REPO" != *@*:* ]]; then
      die "--repo '$REPO' is neither a local directory nor a git URL"
    fi
    if is_local_repo && [[ -n "$BRANCH" ]]; then
      warn "--branch is ignored for a local --repo (the working tree is copied as it is)"
    fi
  fi
}

# ----------------------------------------------------------------------------- zone, project
# Read KEY of [SECTION] from the active gcloud configuration file without running gcloud
# (used by --dry-run). Sets REPLY.
gcloud_config_file_value() {
  local section="$1" key="$2" dir cfg="default" file line current=""
  local header_re='^[[:space:]]*\[([^]]*)\][[:space:]]*$'
  local kv_re="^[[:space:]]*${key}[[:space:]]*=[[:space:]]*([^[:space:]]+)[[:space:]]*$"
  REPLY=""
  dir="${CLOUDSDK_CONFIG:-${HOME:-/nonexistent}/.config/gcloud}"
  if [[ -n "${CLOUDSDK_ACTIVE_CONFIG_NAME:-}" ]]; then
    cfg="$CLOUDSDK_ACTIVE_CONFIG_NAME"
  elif [[ -r "$dir/active_config" ]]; then
    read -r cfg <"$dir/active_config" || true
    cfg="${cfg:-default}"
  fi
  file="$dir/configurations/config_$cfg"
  [[ -r "$file" ]] || return 0
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" =~ $header_re ]]; then
      current="${BASH_REMATCH[1]}"
    elif [[ "$current" == "$section" && "$line" =~ $kv_re ]]; then
      REPLY="${BASH_REMATCH[1]}"
    fi
  done <"$file"
}

# gcloud's own value of compute/zone or core/project. Sets REPLY.
gcloud_config_value() {
  local section="$1" key="$2" env_name="$3"
  REPLY="${!env_name:-}"
  [[ -z "$REPLY" ]] || return 0
  if [[ "$DRY_RUN" == 1 ]]; then
    gcloud_config_file_value "$section" "$key"
  elif command -v gcloud >/dev/null 2>&1; then
    REPLY="$(gcloud config get-value "$section/$key" 2>/dev/null || true)"
  fi
}

resolve_location() {
  if [[ -z "$ZONE" ]]; then
    gcloud_config_value compute zone CLOUDSDK_COMPUTE_ZONE
    ZONE="$REPLY"
  fi
  [[ -n "$ZONE" ]] ||
    die "missing --zone: pass --zone ZONE, set TPU_ZONE, or run 'gcloud config set compute/zone ZONE'"
  if [[ -z "$PROJECT" ]]; then
    gcloud_config_value core project CLOUDSDK_CORE_PROJECT
    PROJECT="$REPLY"
  fi
  [[ -n "$PROJECT" ]] ||
    die "missing --project: pass --project PROJECT, set TPU_PROJECT, or run 'gcloud config set project PROJECT'"
  LOC=(--zone="$ZONE" --project="$PROJECT")
}

require_gcloud() {
  if [[ "$DRY_RUN" == 1 ]]; then return 0; fi
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found: install the Google Cloud CLI (or use --dry-run to see the plan)"
}

# Runtime version by TPU generation (cloud.google.com/tpu/docs/runtimes).
default_version() {
  case "$ACCELERATOR_TYPE" in
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) printf 'tpu-ubuntu2204-base' ;;
  esac
}

# ----------------------------------------------------------------------------- state
# Run a `describe --format=value(...)` and set STATE to its output, or to "" if the resource
# does not exist. Any other gcloud failure is fatal. With --dry-run: print it, STATE="".
describe_state() {
  local out rc=0 err
  STATE=""
  if [[ "$DRY_RUN" == 1 ]]; then
    run "$@"
    return 0
  fi
  out="$("$@" 2>"$ERR_FILE")" || rc=$?
  if [[ $rc -eq 0 ]]; then
    STATE="$out"
    return 0
  fi
  err="$(<"$ERR_FILE")" || true
  case "$err" in
    *NOT_FOUND* | *"not found"*) return 0 ;;
  esac
  die "'$(format_cmd "$@")' failed (exit $rc): $err"
}

node_state() {
  describe_state gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format='value(state)'
}

qr_state() {
  describe_state gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" \
    --format='value(state.state)'
}

# Poll with `getter` until its state is one of the given ones ("" stands for: gone).
# States listed in FAIL_STATES end the wait with an error. Bounded by --wait-timeout.
FAIL_STATES=""
wait_for() {
  local what="$1" getter="$2" start=$SECONDS want
  shift 2
  if [[ "$DRY_RUN" == 1 ]]; then
    "$getter"
    return 0
  fi
  while true; do
    "$getter"
    for want in "$@"; do
      [[ "$STATE" == "$want" ]] && return 0
    done
    if [[ -n "$STATE" && " $FAIL_STATES " == *" $STATE "* ]]; then
      die "$what is $STATE while waiting for ${*:-it to disappear}"
    fi
    if ((SECONDS - start >= WAIT_TIMEOUT)); then
      die "timed out after ${WAIT_TIMEOUT}s waiting for $what to be ${*:-gone} (last state: ${STATE:-absent})"
    fi
    log "$what: ${STATE:-absent}; waiting for ${*:-deletion} (${POLL_INTERVAL}s)"
    sleep "$POLL_INTERVAL"
  done
}

wait_node_ready() {
  FAIL_STATES="PREEMPTED TERMINATED STOPPED STOPPING DELETING"
  wait_for "node $NAME" node_state READY
}

wait_qr_active() {
  FAIL_STATES="FAILED SUSPENDED SUSPENDING DELETING"
  wait_for "queued resource $NAME" qr_state ACTIVE
}

wait_node_gone() {
  FAIL_STATES=""
  wait_for "node $NAME" node_state ""
}

wait_qr_gone() {
  FAIL_STATES=""
  wait_for "queued resource $NAME" qr_state ""
}

# ----------------------------------------------------------------------------- lifecycle
create_node() {
  local version="${VERSION:-$(default_version)}" capacity=()
  if [[ "$QUEUED" == 1 ]]; then
    if [[ "$SPOT" == 1 || "$PREEMPTIBLE" == 1 ]]; then
      capacity=(--spot)
      if [[ "$PREEMPTIBLE" == 1 ]]; then log "queued resources have no --preemptible; using --spot"; fi
    fi
    # Let the request expire when we stop waiting for it, so that it cannot turn ACTIVE (and
    # cost money) later, unattended.
    if [[ "$WAIT_TIMEOUT" -gt 0 ]]; then capacity+=(--valid-until-duration="${WAIT_TIMEOUT}s"); fi
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOC[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" \
      ${capacity[@]+"${capacity[@]}"} || die "could not create queued resource $NAME"
    log "waiting for queued resource $NAME to be ACTIVE (up to ${WAIT_TIMEOUT}s)"
    wait_qr_active
  else
    if [[ "$SPOT" == 1 ]]; then capacity=(--spot); fi
    if [[ "$PREEMPTIBLE" == 1 ]]; then capacity=(--preemptible); fi
    run gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$version" \
      ${capacity[@]+"${capacity[@]}"} || die "could not create TPU VM $NAME"
  fi
  wait_node_ready
  CREATED=1
}

# Delete the queued resource (with its node) or the node. Absent is fine.
delete_node() {
  if [[ "$QUEUED" == 1 ]]; then
    qr_state
    if [[ "$DRY_RUN" == 1 || -n "$STATE" ]]; then
      if [[ "$STATE" != DELETING ]]; then
        run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet ||
          die "could not delete queued resource $NAME"
      fi
      wait_qr_gone
    fi
    # The forced delete takes the node with it; a node made without a queued resource is
    # deleted below.
    if [[ "$DRY_RUN" == 1 ]]; then return 0; fi
  fi
  node_state
  if [[ "$DRY_RUN" == 1 || -n "$STATE" ]]; then
    if [[ "$STATE" != DELETING ]]; then
      run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet ||
        die "could not delete TPU VM $NAME"
    fi
    wait_node_gone
  fi
}

recreate_node() {
  log "$1: deleting and recreating $NAME"
  delete_node
  create_node
}

# Make sure the node exists and is READY, creating or recreating it as needed.
# Sets CREATED=1 when the node is new (and so needs setup).
ensure_node() {
  CREATED=0
  if [[ "$QUEUED" == 1 ]]; then
    qr_state
    case "$STATE" in
      "") create_node ;;
      ACTIVE)
        node_state
        case "$STATE" in
          READY) ;;
          CREATING | STARTING | RESTARTING | REPAIRING) wait_node_ready ;;
          *) recreate_node "node of queued resource is ${STATE:-gone}" ;;
        esac
        ;;
      ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | CREATING)
        log "queued resource $NAME is $STATE"
        wait_qr_active
        wait_node_ready
        CREATED=1
        ;;
      FAILED | SUSPENDED | SUSPENDING) recreate_node "queued resource is $STATE" ;;
      DELETING)
        wait_qr_gone
        create_node
        ;;
      *) die "queued resource $NAME is in unexpected state '$STATE'" ;;
    esac
  else
    node_state
    case "$STATE" in
      "") create_node ;;
      READY) ;;
      CREATING | STARTING | RESTARTING | REPAIRING) wait_node_ready ;;
      PREEMPTED | TERMINATED) recreate_node "node is $STATE" ;;
      STOPPED)
        run gcloud compute tpus tpu-vm start "$NAME" "${LOC[@]}" || die "could not start $NAME"
        wait_node_ready
        ;;
      DELETING)
        wait_node_gone
        create_node
        ;;
      *) die "node $NAME is in unexpected state '$STATE'" ;;
    esac
  fi
}

# ----------------------------------------------------------------------------- remote work
ssh_all() {
  local script="$1"
  shift
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --quiet "$@" \
    --command="$script"
}

# Pack the local checkout: git-tracked plus untracked-but-not-ignored files when it is a git
# repository (so venvs, checkpoints etc. stay behind), else everything but the usual clutter.
make_tarball() {
  TARBALL="${TMPDIR:-/tmp}/vpt-src.$$.tar.gz"
  if [[ -e "$REPO/.git" ]] && { [[ "$DRY_RUN" == 1 ]] || command -v git >/dev/null 2>&1; }; then
    if [[ "$DRY_RUN" == 1 ]]; then
      printf '+ %s | %s\n' "$(format_cmd git -C "$REPO" ls-files -z -co --exclude-standard)" \
        "$(format_cmd tar -C "$REPO" --null -T - -czf "$TARBALL")"
      return 0
    fi
    log "packing $REPO (git ls-files -co --exclude-standard) into $TARBALL"
    local f files=()
    while IFS= read -r -d '' f; do
      if [[ -e "$REPO/$f" ]]; then files+=("$f"); fi  # skip tracked files deleted in the tree
    done < <(git -C "$REPO" ls-files -z -co --exclude-standard)
    [[ ${#files[@]} -gt 0 ]] || die "no files to copy in $REPO"
    printf '%s\0' "${files[@]}" | tar -C "$REPO" --null -T - -czf "$TARBALL"
  else
    run tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=venv --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache -czf "$TARBALL" .
  fi
}

setup_script() {
  local dir="\$HOME/$REMOTE_DIR" venv="\$HOME/$REMOTE_VENV"
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  local fetch
  if is_local_repo; then
    fetch="rm -rf \"$dir\" && mkdir -p \"$dir\" && tar -xzf \"\$HOME/vpt-src.tar.gz\" -C \"$dir\" && rm -f \"\$HOME/vpt-src.tar.gz\""
  else
    fetch="rm -rf \"$dir\" && git clone -q --depth 1${BRANCH:+ --branch $(rquote "$BRANCH")} $(rquote "$REPO") \"$dir\""
  fi
  # jax >= 0.7 needs Python >= 3.11; the Ubuntu 22.04 TPU images ship 3.10, so fall back to
  # the python3.11 package. Every step is idempotent: re-running setup refreshes the code.
  printf '%s' "set -e; $fetch; PY=; for c in python3.13 python3.12 python3.11; do if command -v \$c >/dev/null 2>&1; then PY=\$c; break; fi; done; if [ -z \"\$PY\" ]; then $apt update -q && $apt install -y -q python3.11 python3.11-venv; PY=python3.11; fi; if [ ! -x \"$venv/bin/python\" ]; then \$PY -m venv \"$venv\" || { $apt install -y -q \$PY-venv && \$PY -m venv \"$venv\"; }; fi; \"$venv/bin/pip\" install -q -U pip && cd \"$dir\" && \"$venv/bin/pip\" install -q -e . $(rquote "$JAX_REQUIREMENT") && \"$venv/bin/python\" -c \"import jax, vpt; print(jax.__version__)\""
}

setup() {
  if is_local_repo; then
    make_tarball
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:vpt-src.tar.gz" "${LOC[@]}" \
      --worker=all --quiet
  fi
  log "installing vpt on every worker of $NAME"
  ssh_all "$(setup_script)"
}

train_script() {
  local dir="\$HOME/$REMOTE_DIR" venv="\$HOME/$REMOTE_VENV" logs="\$HOME/$REMOTE_LOG_DIR"
  local cmd="VPT_MULTIHOST=1" word
  for word in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
    cmd="$cmd ${word%%=*}=$(rquote "${word#*=}")"
  done
  cmd="$cmd python -m vpt.main --config $(rquote "$CONFIG") --workdir $(rquote "$WORKDIR")"
  for word in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
    cmd="$cmd $(rquote "$word")"
  done
  printf '%s' "set -o pipefail; mkdir -p \"$logs\" && cd \"$dir\" && . \"$venv/bin/activate\" && $cmd 2>&1 | tee -a \"$logs/$NAME-\$(hostname).log\""
}

# One attempt on all workers; returns the job's exit status.
run_training() {
  ssh_all "$(train_script)" --ssh-flag=-oServerAliveInterval=60
}

# ----------------------------------------------------------------------------- subcommands
cmd_create() { ensure_node; }

cmd_setup() {
  if [[ "$DRY_RUN" != 1 ]]; then
    node_state
    [[ "$STATE" == READY ]] || die "node $NAME is ${STATE:-absent}, not READY: run '${0##*/} create' first"
  fi
  setup
}

cmd_train() {
  local attempt=0 rc=0 first=1
  if [[ "$TEARDOWN" == 1 ]]; then
    TEARDOWN_ARMED=1
  fi
  while true; do
    ensure_node
    if [[ "$CREATED" == 1 ]] || [[ "$first" == 1 && "$SKIP_SETUP" != 1 ]]; then
      setup
    fi
    first=0
    log "attempt $((attempt + 1))/$((MAX_RESTARTS + 1)): training on all workers of $NAME"
    rc=0
    run_training || rc=$?
    if [[ "$DRY_RUN" == 1 ]]; then break; fi
    # A preempted VM's SIGTERM makes vpt save and exit, possibly with status 0: check the node.
    if [[ "$QUEUED" == 1 ]]; then
      qr_state
      if [[ "$STATE" == ACTIVE ]]; then node_state; fi
    else
      node_state
    fi
    if [[ $rc -eq 0 && "$STATE" == READY ]]; then
      log "training finished"
      break
    fi
    if [[ "$STATE" != READY ]]; then
      log "$NAME is ${STATE:-gone} after the job exited with status $rc (preempted?)"
      [[ $rc -ne 0 ]] || rc=1
    else
      log "training exited with status $rc"
    fi
    if [[ $attempt -ge $MAX_RESTARTS ]]; then
      log "giving up after $((attempt + 1)) attempt(s) (--max-restarts $MAX_RESTARTS)"
      break
    fi
    attempt=$((attempt + 1))
    log "restarting ($attempt/$MAX_RESTARTS); vpt resumes from the newest checkpoint in $WORKDIR"
    sleep "$POLL_INTERVAL"
  done
  return "$rc"
}

cmd_status() {
  if [[ "$QUEUED" == 1 || "$DRY_RUN" != 1 ]]; then
    qr_state
    if [[ "$QUEUED" == 1 || -n "$STATE" ]]; then
      printf 'queued resource %s: %s\n' "$NAME" "${STATE:-absent}"
    fi
  fi
  node_state
  printf 'node %s (%s, %s): %s\n' "$NAME" "$ZONE" "$PROJECT" "${STATE:-absent}"
}

cmd_ssh() {
  local extra=()
  if [[ ${#EXTRA_ARGS[@]} -gt 0 ]]; then
    extra=(--command="${EXTRA_ARGS[*]}")
  fi
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$WORKER" \
    ${extra[@]+"${extra[@]}"}
}

cmd_delete() { delete_node; }

main() {
  parse_args "$@"
  validate
  require_gcloud
  resolve_location
  trap on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  if [[ "$DRY_RUN" == 1 ]]; then log "dry run: printing the commands instead of running them"; fi
  case "$COMMAND" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    train) cmd_train ;;
    status) cmd_status ;;
    ssh) cmd_ssh ;;
    delete) cmd_delete ;;
  esac
}

main "$@"
