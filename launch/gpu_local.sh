#!/usr/bin/env bash
# convirt_jax on one machine with NVIDIA GPUs: one process that drives every visible GPU.
#
# A single JAX process sees all local GPUs as its devices and shards each batch over them, so no
# distributed setup is involved. Restrict the GPUs with CUDA_VISIBLE_DEVICES.
set -euo pipefail
if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404 )); then
  echo "${0##*/}: error: needs bash >= 4.4, this is $BASH_VERSION" >&2
  exit 2
fi

SCRIPT_NAME=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly SCRIPT_NAME REPO_ROOT

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [--setup] [options] --config=FILE --workdir=DIR [--config.KEY=VALUE ...] [-- ...]

Runs the job (pretraining or transfer) on every GPU of this machine with one process; relative paths are taken from the repository
root ($REPO_ROOT). With --setup and neither --config nor --workdir, only installs.

Options; each can also be given as the environment variable in brackets:
  --job=JOB           [JOB]         pretrain (default: python -m convirt_jax.main), transfer
                                    (python -m convirt_jax.transfer) or a module name
  --config=FILE       [CONFIG]      config file, e.g. configs/mimic.py
  --workdir=DIR       [WORKDIR]     output directory (a local path)
  --setup             [SETUP=1]     first create the venv (if absent), install requirements.txt + jax[cudaNN]
  --cuda=auto|12|13   [CUDA_MAJOR]  CUDA wheels for --setup; auto: 13 when the driver is >= 580, else 12
  --venv=DIR          [VENV]        virtualenv to create and run with (default: REPO/.venv)
  --python=EXE        [PYTHON]      interpreter that creates the venv (default: python3, must be >= 3.11)
  --dry-run           [DRY_RUN=1]   print every command instead of running it
  -h, --help                        show this help

Arguments of the form --config.KEY=VALUE, anywhere or after --, go to the program unchanged.
JAX_PLATFORMS defaults to cuda, so a broken GPU installation fails instead of training on the CPU.

Examples:
  $SCRIPT_NAME --setup --config=configs/mimic.py --workdir=runs/mimic --config.train.batch_size=256
  $SCRIPT_NAME --job=transfer --config=configs/transfer/chexpert.py --workdir=runs/transfer_chexpert \\
      --config.encoders="('runs/mimic','imagenet','random')" --config.data.dir=/data/chexpert
EOF
}

# shellcheck source=launch/lib.sh
source "$REPO_ROOT/launch/lib.sh"

JOB=${JOB:-pretrain}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
SETUP=${SETUP:-0}
CUDA_MAJOR=${CUDA_MAJOR:-auto}
VENV=${VENV:-$REPO_ROOT/.venv}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
if is_true "$DRY_RUN"; then DRY_RUN=1; else DRY_RUN=0; fi

overrides=()
while (( $# > 0 )); do
  case $1 in
    --config.*) overrides+=("$1"); shift; continue ;;
    --) shift; overrides+=("$@"); break ;;
  esac
  if [[ $1 == --*=* ]]; then
    flag=${1%%=*}; value=${1#*=}; shift
  elif [[ $1 =~ ^--(job|config|workdir|cuda|venv|python)$ ]]; then
    [[ $# -ge 2 && $2 != -* ]] || die "$1 needs a value"
    flag=$1; value=$2; shift 2
  else
    flag=$1; value=""; shift
  fi
  case $flag in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --setup) SETUP=1 ;;
    --job) JOB=$value ;;
    --config) CONFIG=$value ;;
    --workdir) WORKDIR=$value ;;
    --cuda) CUDA_MAJOR=$value ;;
    --venv) VENV=$value ;;
    --python) PYTHON=$value ;;
    *) die "unknown argument '$flag' (see --help)" ;;
  esac
done

job_module "$JOB"
[[ $CUDA_MAJOR =~ ^(auto|12|13)$ ]] || die "CUDA_MAJOR must be auto, 12 or 13, got '$CUDA_MAJOR'"
train=1
if is_true "$SETUP" && [[ -z $CONFIG && -z $WORKDIR && ${#overrides[@]} -eq 0 ]]; then train=0; fi
if (( train )); then
  [[ -n $CONFIG ]] || die "CONFIG is not set (--config=configs/<name>.py)"
  [[ -n $WORKDIR ]] || die "WORKDIR is not set (--workdir=DIR)"
fi

cd "$REPO_ROOT"
(( DRY_RUN )) && echo "cd $(quote "$REPO_ROOT")"
if (( train && ! DRY_RUN )) && [[ ! -f ${CONFIG%%:*} ]]; then
  die "CONFIG file not found: ${CONFIG%%:*} (relative to $REPO_ROOT)"
fi

# The GPUs as nvidia-smi lists them, narrowed to CUDA_VISIBLE_DEVICES when that is set.
gpu_lines=""
driver=""
if command -v nvidia-smi >/dev/null; then
  gpu_lines=$(nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null) ||
    gpu_lines=""
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null) || driver=""
  driver=${driver%%$'\n'*}  # one line per GPU, all the same
fi
if [[ -n $gpu_lines ]]; then
  num_gpus=$(grep -c . <<<"$gpu_lines")
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
    num_gpus=${#visible[@]}
    note "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  fi
  note "$num_gpus GPU(s), driver $driver, one process drives them all:"
  while IFS= read -r line; do note "  $line"; done <<<"$gpu_lines"
else
  note "warning: nvidia-smi lists no GPU: with JAX_PLATFORMS=cuda the program will stop at start-up"
fi

if is_true "$SETUP"; then
  if [[ $CUDA_MAJOR == auto ]]; then
    # CUDA 13 wheels need driver >= 580; CUDA 12 ones run on >= 525.
    CUDA_MAJOR=12
    if [[ ${driver%%.*} =~ ^[0-9]+$ ]] && (( ${driver%%.*} >= 580 )); then CUDA_MAJOR=13; fi
    note "installing jax[cuda$CUDA_MAJOR] (driver ${driver:-unknown})"
  fi
  if [[ ! -x $VENV/bin/python ]]; then
    if (( ! DRY_RUN )); then
      command -v "$PYTHON" >/dev/null || die "PYTHON '$PYTHON' not found"
      "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "PYTHON '$PYTHON' is $("$PYTHON" -V 2>&1); the pinned requirements need Python >= 3.11"
    fi
    run "$PYTHON" -m venv "$VENV"
  fi
  run "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # Unpinned jax[cudaNN] next to requirements.txt's jax==X adds the CUDA plugin of that same version.
  run "$VENV/bin/python" -m pip install --quiet -r requirements.txt "jax[cuda$CUDA_MAJOR]"
fi
(( train )) || exit 0

python=$PYTHON
if [[ -x $VENV/bin/python ]] || is_true "$SETUP"; then python=$VENV/bin/python; fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
(( DRY_RUN )) && echo "export JAX_PLATFORMS=$(quote "$JAX_PLATFORMS")"
main=("$python" -m "$JOB_MODULE" --config="$CONFIG" --workdir="$WORKDIR" "${overrides[@]}")
if (( DRY_RUN )); then
  run "${main[@]}"
else
  exec "${main[@]}"
fi
