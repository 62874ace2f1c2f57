#!/usr/bin/env bash
# One GPU session with a random-weights checkpoint, on a host with no internet:
#   scripts/gpu_bundle.py --stubs (here, with internet) -> copy .gpu-bundle -> this script there.
# Steps (each logged to $OUT/<step>.log; a failing step does not stop the next):
#   install the bundle, write the checkpoint, bench/gpu.py, the service job, a recorded output;
#   also: gputest, compare, service (bench/service_gpu.py over HTTP), pipeline (3M-face stand-in),
#   batchcheck (generate_batch on the real pipeline), texturejob (a textured job through HTTP),
#   texturebench (bench/texture.py on the host's cores and on the card).
# STEPS="install ckpt bench job record" by default; CKPT=/tmp/sam3d-random.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu-session}"; mkdir -p "$OUT"
CKPT="${CKPT:-/tmp/sam3d-random}"
STEPS="${STEPS:-install ckpt bench job record}"
VOXELS="${VOXELS:-20000}"
export PYTHONUNBUFFERED=1 SAM3D_LOG_LEVEL="${SAM3D_LOG_LEVEL:-INFO}"
step() { local name=$1; shift; echo "== $name: $*"; local t0=$SECONDS
  timeout "${STEP_TIMEOUT:-400}" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-25}" "$OUT/$name.log"; return $rc; }
for s in $STEPS; do
  case $s in
    install) echo "== install"; bash .gpu-bundle/install.sh /tmp/site >/tmp/site.env 2>"$OUT/install.log"
      echo "== install rc=$?"; tail -5 "$OUT/install.log"; source /tmp/site.env ;;
    env) source /tmp/site.env ;;  # a later run of this script after "install"
    ckpt) step ckpt python3 scripts/sam3d_random_checkpoint.py "$CKPT" --configs .gpu-bundle/configs \
      ${BIAS_SHIFT:+--bias-shift "$BIAS_SHIFT"} --voxels "$VOXELS" ;;
    gputest) step gputest env SAM3D_CHECKPOINT_DIR="$CKPT" python3 -m pytest -x -q -s -m gpu \
      -p no:cacheprovider tests/test_sam3d_gpu.py tests/test_sam3d_upstream.py ;;
    compare) step "${NAME:-compare}" python3 bench/gpu.py --checkpoint "$CKPT" --compare "${COMPARE:-1,4,8}" \
      --modes "${MODES:-default,fast}" ${FLOPS:+--flops} ${NO_STAGES:+--no-stages} --repeat 1 \
      --ways "${WAYS:-upstream,ours}" ${PROFILE:+--profile "$PROFILE"} ${SHELLS:+--shell-voxels} \
      ${ATTENTION:+--attention} --json "$OUT/${NAME:-compare}.json" ;;
    compile) step compile env SAM3D_COMPILE_MODEL=true python3 bench/gpu.py --checkpoint "$CKPT" ${SHELLS:+--shell-voxels} \
      --compare "${COMPILE_COMPARE:-default:1}" --ways upstream,ours --modes default --no-stages \
      --json "$OUT/compile.json" ;;
    bench) step bench python3 bench/gpu.py --checkpoint "$CKPT" --json "$OUT/bench.json" ;;
    segmenter) step segmenter python3 bench/gpu.py --checkpoint "$CKPT" --segmenter sam3 \
      --segmenter-only --json "$OUT/segmenter.json" ;;
    flops) step flops python3 bench/gpu.py --checkpoint "$CKPT" --modes "${MODES:-default}" --repeat 1 \
      --flops --json "$OUT/flops.json" ;;
    job) step job python3 scripts/gpu_sam3d_job.py --checkpoint "$CKPT" --out "$OUT/job" ;;
    texturejob) step texturejob python3 scripts/gpu_sam3d_job.py --checkpoint "$CKPT" \
      --out "$OUT/texturejob" --options '{"texture": 1024, "mesh": {"target_faces": 200000}}' \
      --keep objects/0.glb ;;
    texturebench) step texturebench python3 bench/texture.py --all-cores --device cuda \
      --cases sam3d,sam3d-device --repeat 3 ;;
    service) step service python3 bench/service_gpu.py --checkpoint "$CKPT" \
      --scenarios "${SCENARIOS:-a,b,c,d}" --reps "${REPS:-2}" ${NO_IN_PROCESS:+--no-in-process} ${CANCEL:+--cancel} \
      --json "$OUT/${NAME:-service}.json" --logs "$OUT/${NAME:-service}-logs" ;;
    pipeline) step pipeline env SAM3D_BENCH_GRID_ROWS=1500 SAM3D_BENCH_SPLATS=750000 \
      python3 bench/pipeline.py --sleep 0.5 --jobs 4 --skip-large ;;
    batchcheck) step batchcheck python3 scripts/gpu_batch_check.py --checkpoint "$CKPT" ;;
    record) step record python3 scripts/sam3d_record_output.py --checkpoint "$CKPT" --out "$OUT/sam3d_output" ;;
  esac
done
