#!/usr/bin/env bash
# One check of convirt_jax on a GPU machine, in about 5 minutes, ending in one table:
#   1. throughput: the paper's train step (ResNet50 224 px + BERT-base, 6 frozen, seq 128), bf16,
#      plain and micro-batched, images/s and MFU, next to the same step in PyTorch (--peer);
#   2. memory: XLA's compiled memory of the step, micro-batched at 256 and 4096 rows per device, plain
#      and remat at 256 (compile only);
#   3. the embedded default for 200 bf16 steps: python -m convirt_jax.main --config=configs/synthetic.py
#      --config.train.steps=200 --config.train.precision=bfloat16 (then its evaluation);
#   4. the plan (python -m convirt_jax.plan, on the CPU) of part 1's plain step for --plan_target: its
#      roofline bound is printed next to part 1's measured step time.
# 1 runs alone (it is timed); 2, 3 and 4 then run side by side, none preallocating GPU memory. Each part
# has its own time limit; a part that fails or runs out of time shows as such in the table.
#
# Needs the project's requirements, jax[cuda12] (or [cuda13]) and, for the PyTorch column,
# requirements-test.txt's torch/torchvision with a CUDA build the driver supports.
#
#   benchmarks/accelerator_check.sh [--out=DIR] [--python=EXE] [--plan_target=NAME] [--dry-run] [--smoke]
#
#   --out=DIR     where logs, JSON and the synthetic run's workdir go (default: a new /tmp directory)
#   --python=EXE  interpreter with the requirements (default: $PYTHON, else python)
#   --plan_target=NAME  the plan's target for this GPU (default h100x1; a100-80gbx1, h200x1, ...)
#   --dry-run     print the commands instead of running them
#   --smoke       the same plumbing on the CPU at tiny sizes (a test of this script, not of a GPU)
set -uo pipefail

SCRIPT_NAME=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC2034  # SCRIPT_NAME is read by lib.sh's die and note
readonly SCRIPT_NAME REPO_ROOT
# shellcheck source=launch/lib.sh
source "$REPO_ROOT/launch/lib.sh"

OUT=""
PYTHON=${PYTHON:-python}
DRY_RUN=0
SMOKE=0
PLAN_TARGET=h100x1
for arg in "$@"; do
  case $arg in
    --out=*) OUT=${arg#*=} ;;
    --python=*) PYTHON=${arg#*=} ;;
    --plan_target=*) PLAN_TARGET=${arg#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    --smoke) SMOKE=1 ;;
    -h | --help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
if [[ -z $OUT ]]; then
  if (( DRY_RUN )); then OUT=/tmp/convirt_accelerator_check; else OUT=$(mktemp -d /tmp/convirt_check.XXXXXX); fi
fi
cd "$REPO_ROOT" || die "cannot cd to $REPO_ROOT"

if (( SMOKE )); then
  export JAX_PLATFORMS=cpu
  # Tiny sizes: every part runs on a 2-core CPU in a few minutes.
  model=(--depth=18 --image_size=64 --text_layers=2 --text_hidden=128 --frozen_layers=1 --seq_len=32)
  throughput=("${model[@]}" --batches=8 --precisions=bfloat16 "--modes=plain,micro" --microbatch=4
              --steps=2 --warmup=1 --peer)
  memory_micro=("${model[@]}" --devices=1 "--batches=64,256" --modes=micro --microbatch=16)
  memory_plain=("${model[@]}" --devices=1 --batches=64 "--modes=plain,remat")
  run_config=tests/tiny_config.py
  run_steps=4
  plan=(--config=tests/tiny_config.py --rows_per_chip=8 --config.train.remat=false
        --config.train.microbatch_size=0)
  limits=(600 300 600 600)  # throughput; each memory run; the run; the plan
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
  throughput=(--batches=128 --precisions=bfloat16 "--modes=plain,micro" --microbatch=32 --steps=10
              --warmup=2 --peer)
  memory_micro=(--devices=1 "--batches=256,4096" --modes=micro --microbatch=32 --precision=bfloat16)
  memory_plain=(--devices=1 --batches=256 "--modes=plain,remat" --precision=bfloat16)
  run_config=configs/synthetic.py
  run_steps=200
  # Part 1's plain step: ResNet50 224 px, BERT-base (configs/mimic.py's, 6 frozen), seq 128, 128 rows.
  plan=(--config=configs/mimic.py --rows_per_chip=128 --config.model.text.max_length=128
        --config.model.text.frozen_layers=6 --config.train.remat=false --config.train.microbatch_size=0)
  # Seconds: part 1; then the two memory runs one after the other, beside part 3 (whose 200 steps are
  # followed by the run's evaluation) and part 4 (one compile of the paper's step on the CPU).
  limits=(170 55 110 300)
fi

# part NAME LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds (then TERM, 10 s later KILL, to
# its whole process group); stdout, stderr and the exit status go to $OUT/NAME.{log,err,rc}.
part() {
  local name=$1 limit=$2
  shift 2
  if (( DRY_RUN )); then
    echo "timeout -k 10 $limit $(join_quoted "$@") >$(quote "$OUT/$name.log") 2>$(quote "$OUT/$name.err")"
    return 0
  fi
  local began=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>"$OUT/$name.err"
  echo "$?" >"$OUT/$name.rc"
  echo "$((SECONDS - began))" >"$OUT/$name.seconds"
}

run mkdir -p "$OUT"
note "output in $OUT"
start=$SECONDS

# 1. Throughput, alone on the device (throughput.py runs torch_peer.py before JAX takes the GPU).
part throughput "${limits[0]}" "$PYTHON" benchmarks/throughput.py "${throughput[@]}" --json

# 2 and 3 side by side, each allocating only the GPU memory it uses.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
(( DRY_RUN )) && echo "export XLA_PYTHON_CLIENT_PREALLOCATE=false"
(
  part memory_micro "${limits[1]}" "$PYTHON" benchmarks/memory.py "${memory_micro[@]}" --json
  part memory_plain "${limits[1]}" "$PYTHON" benchmarks/memory.py "${memory_plain[@]}" --json
) &
memory_pid=$!
(
  part plan "${limits[3]}" "$PYTHON" -m convirt_jax.plan "${plan[@]}" --target="$PLAN_TARGET" \
    --input_seconds=0 --json="$OUT/plan.json"
) &
plan_pid=$!
part synthetic "${limits[2]}" "$PYTHON" -m convirt_jax.main --config="$run_config" \
  --workdir="$OUT/synthetic" --config.train.steps="$run_steps" --config.train.precision=bfloat16
wait "$memory_pid"
wait "$plan_pid"
(( DRY_RUN )) && exit 0

"$PYTHON" - "$OUT" "$((SECONDS - start))" "$run_steps" <<'EOF'
import json, os, sys

out, total_s, run_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def read(name):
  path = os.path.join(out, name)
  return open(path).read() if os.path.exists(path) else ""

def status(part):
  rc = read(part + ".rc").strip()
  return {"0": "ok", "124": "TIMEOUT", "": "not run"}.get(rc, f"FAILED (exit {rc})")

def result(part):
  lines = [l for l in read(part + ".log").splitlines() if l.startswith("RESULT ")]
  return json.loads(lines[-1][len("RESULT "):]) if lines else None

rows = []  # (part, setting, figures)
t = result("throughput")
if t:
  peaks = t["peaks"]
  for r in t["rows"]:
    peak = peaks[r["precision"]][0]
    figures = (f"{r['images_per_s']:.0f} img/s, {r['step_s'] * 1e3:.0f} ms/step, "
               f"MFU {r['achieved_tflops'] / peak:.1%}, compile {r['compile_s']:.0f} s")
    peer = t["peers"].get(f"{r['precision']}/{r['batch']}")
    if peer and r["mode"] == "plain":
      figures += (f"; torch {peer['images_per_s']:.0f} img/s -> jax/torch "
                  f"{r['images_per_s'] / peer['images_per_s']:.2f}" if "error" not in peer
                  else "; torch FAILED (see throughput.log)")
    rows.append(("throughput", f"{r['precision']} {r['mode']} {r['batch']}/device", figures))
else:
  rows.append(("throughput", "", status("throughput") + f": see {out}/throughput.err"))

memory = {}
for part in ("memory_micro", "memory_plain"):
  m = result(part)
  if not m:
    rows.append(("memory", part, status(part) + f": see {out}/{part}.err"))
    continue
  for r in m["rows"]:
    memory[r["mode"], r["per_device"]] = r
    rows.append(("memory", f"{r['mode']} {r['per_device']}/device" +
                 (f" (micro {r['micro']})" if r["micro"] else ""),
                 f"temp {r['temp_mib']:.0f} MiB, state+batch {r['args_mib']:.0f} MiB, logits "
                 f"{r['logits_mib']:.1f} MiB, loss temp {r['loss_temp_mib']:.1f} MiB"))
micro = sorted(b for mode, b in memory if mode == "micro")
if len(micro) >= 2:
  lo, hi = memory["micro", micro[0]], memory["micro", micro[-1]]
  rows.append(("memory", f"micro {micro[0]} -> {micro[-1]}/device",
               f"temp x{hi['temp_mib'] / lo['temp_mib']:.2f}; without the loss's temp x"
               f"{(hi['temp_mib'] - hi['loss_temp_mib']) / max(lo['temp_mib'] - lo['loss_temp_mib'], 1e-9):.2f}"
               " (target <= 1.5)"))

metrics = [json.loads(l) for l in read("synthetic/metrics.jsonl").splitlines() if l.strip()]
train = [m for m in metrics if "train/loss" in m]
val = [m for m in metrics if "val/loss" in m]
figures = f"{status('synthetic')} in {read('synthetic.seconds').strip() or '?'} s"
if train:
  figures += (f"; train loss {train[0]['train/loss']:.3f} (step {train[0]['step']}) -> "
              f"{train[-1]['train/loss']:.3f} (step {train[-1]['step']})")
if val:
  figures += f"; val loss {val[-1]['val/loss']:.3f}"
results = read("synthetic/results.json")
if results:
  figures += "; results.json written"
rows.append(("run", f"synthetic, {run_steps} steps, bf16", figures))

plan = json.loads(read("plan.json") or "null")
if plan and plan["rows"]:
  p = plan["rows"][0]
  bound = p["roofline_bound"]
  figures = (f"{p['target']}, {p['rows_per_chip']} rows: bound {bound['bound_s'] * 1e3:.1f} ms/step "
             f"({bound['bound_by']}-bound, {bound['images_per_s_per_chip']:.0f} img/s; a lower bound, "
             f"not a measurement), {p['flops_per_chip'] / 1e12:.2f} TFLOP, "
             f"{p['memory_bytes']['total'] / 2**30:.2f} GiB planned")
  measured = [r for r in (t or {}).get("rows", []) if r["mode"] == "plain" and r["batch"] == p["rows_per_chip"]
              and r["precision"] == p["precision"]]
  if measured:
    step_ms = measured[0]["step_s"] * 1e3
    figures += f"; measured {step_ms:.1f} ms/step = {step_ms / (bound['bound_s'] * 1e3):.1f}x the bound"
  rows.append(("plan", "roofline bound vs measured", figures))
else:
  rows.append(("plan", "", status("plan") + f": see {out}/plan.err"))

device = (t or {}).get("device", "?")
print(f"\nconvirt_jax accelerator check on {device}: {total_s} s in all; logs in {out}")
width = max(len(r[1]) for r in rows)
print(f"{'part':<11}{'setting':<{width + 2}}figures")
print("-" * (13 + width + 60))
for part, setting, figures in rows:
  print(f"{part:<11}{setting:<{width + 2}}{figures}")
EOF
