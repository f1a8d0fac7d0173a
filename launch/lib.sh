# shellcheck shell=bash
# Helpers shared by tpu_vm.sh and gpu_local.sh (sourced; they set SCRIPT_NAME and DRY_RUN).
# slurm.sbatch keeps its own copy: sbatch runs a spooled copy of it, where no sibling file is found.

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
