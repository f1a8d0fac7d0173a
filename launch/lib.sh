# shellcheck shell=bash
# Helpers shared by tpu_vm.sh, gpu_local.sh and slurm.sbatch (sourced; they set SCRIPT_NAME and DRY_RUN).
# slurm.sbatch finds this file through REPO_DIR: sbatch runs a spooled copy of it, with no sibling file.

die() { echo "$SCRIPT_NAME: error: $*" >&2; exit 2; }
note() { echo "$SCRIPT_NAME: $*" >&2; }
is_true() { case ${1,,} in 1 | true | yes | on) return 0 ;; *) return 1 ;; esac; }

# One word for a shell command line: bare when that is unambiguous, else single-quoted.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
join_quoted() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# Runs a command, or prints it (copy-pastable) under --dry-run.
run() {
  if (( DRY_RUN )); then join_quoted "$@"; echo; else "$@"; fi
}

# --job / JOB: the program a script starts, pretrain (the default), transfer or a module name (a.b).
# Sets JOB_MODULE, or stops naming the accepted values.
# shellcheck disable=SC2034  # JOB_MODULE is read by the scripts that source this file
job_module() {
  case $1 in
    pretrain) JOB_MODULE=convirt_jax.main ;;
    transfer) JOB_MODULE=convirt_jax.transfer ;;
    *)
      [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$ ]] ||
        die "JOB must be pretrain, transfer or a module name such as convirt_jax.transfer (--job=... or JOB=...), got '$1'"
      JOB_MODULE=$1 ;;
  esac
}
