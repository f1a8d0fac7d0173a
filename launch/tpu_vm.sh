#!/usr/bin/env bash
# convirt_jax on a Cloud TPU VM or pod slice: create, setup, run (pretraining or transfer), logs, stop,
# delete.
#
# Every worker of a slice runs the same command (gcloud `--worker=all`); jax.distributed.initialize()
# in the program finds the other workers on its own on Cloud TPU, so nothing distributed is passed here.
set -euo pipefail
if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404 )); then
  echo "${0##*/}: error: needs bash >= 4.4, this is $BASH_VERSION (on macOS: brew install bash)" >&2
  exit 2
fi

SCRIPT_NAME=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly SCRIPT_NAME REPO_ROOT

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME COMMAND... [options] [--config.KEY=VALUE ...] [-- --config.KEY=VALUE ...]

Commands, run in the order given (e.g. "create setup run"):
  create   create the TPU VM / pod slice; an existing one of that name is reused
  setup    put the code on every worker (a copy of this working tree, or git clone --repo at --ref),
           make a Python 3.11 venv there and install requirements.txt + jax[tpu]
  run      start the job (--job: pretraining or transfer) on every worker, detached (setsid nohup)
           so it survives the ssh session; each worker appends to REMOTE_DIR/logs/convirt.log
  logs     print the end of one worker's log (--worker, default 0; --follow to keep following)
  stop     stop the run on every worker
  delete   delete the TPU VM / pod slice

Options; each can also be given as the environment variable in brackets:
  --project=ID           [PROJECT]           default: gcloud's configured project
  --zone=ZONE            [ZONE]              required, e.g. us-central2-b
  --name=NAME            [TPU_NAME]          required
  --accelerator-type=T   [ACCELERATOR_TYPE]  create: e.g. v4-32, v5litepod-16, v5p-64, v6e-16
  --runtime-version=V    [RUNTIME_VERSION]   create: default by generation: v2-v4 tpu-ubuntu2204-base,
                                             v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                 [SPOT=1]            create: Spot TPU (preemptible at any time, no 24 h limit)
  --preemptible          [PREEMPTIBLE=1]     create: legacy preemptible TPU
  --repo=URL             [REPO]              setup: git clone URL on the workers instead of copying this tree
  --ref=REF              [REF]               setup: branch, tag or commit of --repo (default: main)
  --remote-dir=DIR       [REMOTE_DIR]        code directory on the workers, relative to their home
                                             (default: convirt_jax)
  --python-version=X.Y   [PYTHON_VERSION]    setup: the venv's Python, fetched by uv if absent (default: 3.11)
  --job=JOB              [JOB]               run: pretrain (default: python -m convirt_jax.main), transfer
                                             (python -m convirt_jax.transfer) or a module name
  --config=FILE          [CONFIG]            run: config file, relative to the code directory
  --workdir=gs://B/P     [WORKDIR]           run: the run's bucket path, gs://BUCKET/PATH, which every worker
                                             reads and writes directly; or else an absolute path that every
                                             worker shares, e.g. a gcsfuse mount of the bucket (/gcs/BUCKET/PATH)
  --attach               [ATTACH=1]          run: stay attached and stream the output instead of detaching
  --worker=N|all         [WORKER]            logs: which worker (default: 0)
  --follow                                   logs: keep following the log (tail -F)
  --dry-run              [DRY_RUN=1]         print every command instead of running it; no gcloud call
  -h, --help                                 show this help

Arguments of the form --config.KEY=VALUE, anywhere or after --, go to the program unchanged.

Examples:
  $SCRIPT_NAME create setup run --zone=us-central2-b --name=convirt-v4 --accelerator-type=v4-32 \\
      --config=configs/mimic.py --workdir=gs://my-bucket/convirt/run1 --config.train.batch_size=256
  $SCRIPT_NAME run --job=transfer --zone=us-central2-b --name=convirt-v4 \\
      --config=configs/transfer/chexpert.py --workdir=gs://my-bucket/convirt/chexpert \\
      --config.encoders="('gs://my-bucket/convirt/run1','imagenet','random')" --config.data.dir=/data/chexpert
EOF
}

# shellcheck source=launch/lib.sh
source "$REPO_ROOT/launch/lib.sh"
run_pipeline() {
  if (( DRY_RUN )); then echo "$1"; else bash -o pipefail -c "$1"; fi
}

PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
PREEMPTIBLE=${PREEMPTIBLE:-0}
REPO=${REPO:-}
REF=${REF:-main}
REMOTE_DIR=${REMOTE_DIR:-convirt_jax}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JOB=${JOB:-pretrain}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
ATTACH=${ATTACH:-0}
WORKER=${WORKER:-0}
FOLLOW=0
DRY_RUN=${DRY_RUN:-0}
if is_true "$DRY_RUN"; then DRY_RUN=1; else DRY_RUN=0; fi

commands=()
overrides=()
takes_value() {
  case $1 in
    --project | --zone | --name | --accelerator-type | --runtime-version | --repo | --ref | --remote-dir | \
      --python-version | --job | --config | --workdir | --worker) return 0 ;;
    *) return 1 ;;
  esac
}
while (( $# > 0 )); do
  case $1 in
    --config.*) overrides+=("$1"); shift; continue ;;
    --) shift; overrides+=("$@"); break ;;
  esac
  if [[ $1 == --*=* ]]; then
    flag=${1%%=*}; value=${1#*=}; shift
  elif takes_value "$1"; then
    [[ $# -ge 2 && $2 != -* ]] || die "$1 needs a value"
    flag=$1; value=$2; shift 2
  else
    flag=$1; value=""; shift
  fi
  case $flag in
    create | setup | run | logs | stop | delete) commands+=("$flag") ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --attach) ATTACH=1 ;;
    --follow) FOLLOW=1 ;;
    --project) PROJECT=$value ;;
    --zone) ZONE=$value ;;
    --name) TPU_NAME=$value ;;
    --accelerator-type) ACCELERATOR_TYPE=$value ;;
    --runtime-version) RUNTIME_VERSION=$value ;;
    --repo) REPO=$value ;;
    --ref) REF=$value ;;
    --remote-dir) REMOTE_DIR=$value ;;
    --python-version) PYTHON_VERSION=$value ;;
    --job) JOB=$value ;;
    --config) CONFIG=$value ;;
    --workdir) WORKDIR=$value ;;
    --worker) WORKER=$value ;;
    *) die "unknown argument '$flag' (see --help)" ;;
  esac
done

job_module "$JOB"
(( ${#commands[@]} > 0 )) || die "no command given: one or more of create, setup, run, logs, stop, delete"
[[ -n $ZONE ]] || die "ZONE is not set (--zone or ZONE=...)"
[[ -n $TPU_NAME ]] || die "TPU_NAME is not set (--name or TPU_NAME=...)"
[[ -n $REMOTE_DIR && $REMOTE_DIR != /* && $REMOTE_DIR != *..* ]] ||
  die "REMOTE_DIR must be a directory relative to the worker's home, got '$REMOTE_DIR'"
(( DRY_RUN )) || command -v gcloud >/dev/null || die "gcloud not found on PATH (install the Google Cloud CLI)"

scope=(--zone="$ZONE" ${PROJECT:+"--project=$PROJECT"})
remote_dir=$(quote "$REMOTE_DIR")
readonly LOG=logs/convirt.log PID=logs/convirt.pid

on_workers() {  # WORKERS REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${scope[@]}" --worker="$1" --command="$2"
}

default_runtime() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

cmd_create() {
  [[ -n $ACCELERATOR_TYPE ]] || die "ACCELERATOR_TYPE is not set (--accelerator-type, e.g. v4-32)"
  [[ $ACCELERATOR_TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
    die "ACCELERATOR_TYPE '$ACCELERATOR_TYPE' is not a TPU type such as v4-32 or v5litepod-16"
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime "$ACCELERATOR_TYPE") ||
      die "no default runtime for ACCELERATOR_TYPE '$ACCELERATOR_TYPE': set RUNTIME_VERSION"
  fi
  if is_true "$SPOT" && is_true "$PREEMPTIBLE"; then die "SPOT and PREEMPTIBLE exclude each other"; fi
  local create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${scope[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  is_true "$SPOT" && create+=(--spot)
  is_true "$PREEMPTIBLE" && create+=(--preemptible)
  local describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${scope[@]}" --format='value(state)')
  if (( DRY_RUN )); then
    echo "$(join_quoted "${describe[@]}") >/dev/null 2>&1 || $(join_quoted "${create[@]}")"
    return
  fi
  local state
  if state=$("${describe[@]}" 2>/dev/null); then
    # A preempted slice keeps its name but can never run again.
    [[ $state != PREEMPTED ]] || die "$TPU_NAME was preempted: run '$SCRIPT_NAME delete' and create it again"
    note "$TPU_NAME already exists (state $state): reusing it"
  else
    "${create[@]}"
  fi
}

cmd_setup() {
  local get_code
  if [[ -n $REPO ]]; then
    # fetch + detached checkout of FETCH_HEAD works alike for a branch, a tag and a commit.
    get_code="if [ ! -d $remote_dir/.git ]; then git clone --quiet $(quote "$REPO") $remote_dir; fi; "
    get_code+="git -C $remote_dir fetch --quiet origin $(quote "$REF"); "
    get_code+="git -C $remote_dir checkout --quiet --detach FETCH_HEAD"
  else
    local archive=${TMPDIR:-/tmp}/convirt_jax-$TPU_NAME.tar.gz remote_archive=convirt_jax-code.tar.gz
    # Tracked and untracked-but-not-ignored files: the working tree as it is, without venvs or outputs.
    local list_files="git ls-files -z --cached --others --exclude-standard" pack
    pack="tar --null --ignore-failed-read -czf $(quote "$archive") -T -"
    run_pipeline "cd $(quote "$REPO_ROOT") && $list_files | $pack"
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:$remote_archive" "${scope[@]}" --worker=all
    run rm -f "$archive"
    get_code="mkdir -p $remote_dir; tar -xzf $remote_archive -C $remote_dir; rm -f $remote_archive"
  fi
  # TPU images ship Python 3.10 (the pinned numpy needs 3.11): uv provides the venv's interpreter.
  # Unpinned jax[tpu] next to requirements.txt's jax==X adds the extra (libtpu) to that same version.
  local install='python3 -m pip install --user --quiet --upgrade uv 2>/dev/null || '
  install+='python3 -m pip install --user --quiet --upgrade --break-system-packages uv; '
  # shellcheck disable=SC2016  # $HOME is for the worker's shell
  local uv='"$HOME/.local/bin/uv"'
  install+="[ -x .venv/bin/python ] || $uv venv --quiet --python $(quote "$PYTHON_VERSION") .venv; "
  install+="$uv pip install --quiet --python .venv/bin/python -r requirements.txt 'jax[tpu]'; "
  install+='.venv/bin/python -c "import jax; print(\"jax\", jax.__version__, \"installed\")"'
  on_workers all "set -euo pipefail; $get_code; cd $remote_dir; $install"
}

cmd_run() {
  [[ -n $CONFIG ]] || die "CONFIG is not set (--config=configs/<name>.py)"
  [[ -n $WORKDIR ]] || die "WORKDIR is not set (--workdir=gs://BUCKET/PATH)"
  # Every worker writes checkpoints of the one global state: the workdir must be shared storage, a
  # bucket (gs://, read and written by the program itself) or a path mounted alike on every worker.
  [[ $WORKDIR == gs://?* || $WORKDIR == /?* ]] ||
    die "WORKDIR must be an absolute path on storage all workers share (a gcsfuse mount, /gcs/BUCKET/PATH) or gs://BUCKET/PATH, got '$WORKDIR'"
  local main
  main=$(join_quoted .venv/bin/python -m "$JOB_MODULE" --config="$CONFIG" --workdir="$WORKDIR" \
    "${overrides[@]}")
  local cmd="set -euo pipefail; cd $remote_dir; mkdir -p logs; "
  if is_true "$ATTACH"; then
    on_workers all "$cmd$main 2>&1 | tee -a $LOG"
    return
  fi
  # shellcheck disable=SC2016  # evaluated by the worker's shell
  cmd+='if [ -f '$PID' ] && kill -0 "$(cat '$PID')" 2>/dev/null; then '
  # shellcheck disable=SC2016
  cmd+='echo "$(hostname): a run is still active (pid $(cat '$PID')): stop it first" >&2; exit 1; fi; '
  # shellcheck disable=SC2016
  cmd+="setsid nohup $main >> $LOG 2>&1 < /dev/null & "'echo $! > '$PID'; '
  # shellcheck disable=SC2016
  cmd+='echo "$(hostname): started pid $(cat '$PID'), log $PWD/'$LOG'"'
  on_workers all "$cmd"
}

cmd_logs() {
  local tail_args="-n 200"
  (( FOLLOW )) && tail_args+=" -F"
  on_workers "$WORKER" "tail $tail_args $remote_dir/$LOG"
}

cmd_stop() {
  local cmd="cd $remote_dir; "
  # shellcheck disable=SC2016  # evaluated by the worker's shell
  cmd+='if [ -f '$PID' ] && kill "$(cat '$PID')" 2>/dev/null; then echo "$(hostname): stopped"; '
  # shellcheck disable=SC2016
  cmd+='else echo "$(hostname): no active run"; fi'
  on_workers all "$cmd"
}

cmd_delete() {
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${scope[@]}" --quiet
}

for command in "${commands[@]}"; do
  "cmd_$command"
done
