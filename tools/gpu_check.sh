#!/usr/bin/env bash
# The checks a cluster user cares about, on one GPU, within about 10 minutes:
#   0. a training step of every shipped preset (tools/bench/step.py): s/step, model TFLOP/s and that against
#      the GPU's bf16 matmul throughput measured in the same run, channels_last off and on, time by kind of op;
#   1. the training-step matrix (tools/bench/train.py --gpu): UNet 1 (base, micro-batch 16), UNet 2 (sr,
#      micro-batch 8) and UNet 3 (sr1024 on 256 px crops, micro-batch 16) x bf16/fp16 x ZeRO-2/3 x
#      sdpa/xformers, and each UNet compiled (a UNet's compile key) against eager in bf16 under ZeRO-2 and ZeRO-3,
#      STEPS steps each:
#      it/s, samples/s, peak memory beside tools/plan_memory.py's estimate, MFU, finite losses, and the
#      warm-up time (a compiled case's includes compiling); the inductor cache under $RESULTS/inductor;
#   2. the trainer itself (tryon_ds/train.py) in fp16 under ZeRO-2 and ZeRO-3, base preset, on synthetic
#      shards, logging every 10 steps (the fp16 log path reads the loss scale);
#   3. the shipped presets at their real size end to end (tools/bench/real_size.py): base as UNet 1, sr as
#      UNet 2 and sr1024 as UNet 3, in bf16 on this one GPU under ZeRO-3: 2 steps, checkpoint, resume, 1 step,
#      consolidation, one sampling step; the allocator's peak beside the planner's (REAL_SIZE=0 skips it:
#      about 2 minutes a preset).
# Writes $RESULTS/gpu_check.json and $RESULTS/gpu_check.txt (and copies them to $OUT when that is set).
#
#   tools/gpu_check.sh --fetch-wheels   # here, with PyPI: the wheels a GPU node's Python lacks, into .whl/
#   tools/gpu_check.sh                  # on the GPU node: installs .whl/ offline, runs the checks
#   tools/gpu_check.sh --dry-run        # anywhere (CPU): the same set-up and plumbing at the tiny size
#
# Settings: PYTHON (python3), STEPS (60), REAL_SIZE (1), RESULTS (runs/gpu_check), WHEELS_DIR (.whl),
# PY_VERSION of the node's Python (3.12). The node's own torch is kept; xformers is used only if a wheel for
# that torch is in .whl/ (its wheels pin one torch version).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-60}
RESULTS=${RESULTS:-runs/gpu_check}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(realpath -m "$RESULTS")/inductor}
MODE=${1:-run}
# What the GPU node's image lacks of this project's dependencies (its package list: torch, numpy, einops,
# pillow, safetensors, tqdm, tensorboard, torchmetrics, pyyaml, msgpack, ninja, psutil, py-cpuinfo are there).
WHEELS_DIR=${WHEELS_DIR:-.whl}
WHEELS="webdataset braceexpand hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions"

if [ "$MODE" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS_DIR"
    plat=""
    for n in 28 27 17; do plat="$plat --platform manylinux_2_${n}_x86_64"; done
    # shellcheck disable=SC2086
    $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
        --implementation cp $plat --platform manylinux2014_x86_64 -d "$WHEELS_DIR" $WHEELS
    # DeepSpeed publishes a source archive only: build its (pure-Python) wheel here, no ops compiled.
    DS_BUILD_OPS=0 $PYTHON -m pip wheel -q --no-deps -w "$WHEELS_DIR" "deepspeed==$($PYTHON -c 'from importlib.metadata import version; print(version("deepspeed"))')"
    ls -la "$WHEELS_DIR"
    exit 0
fi

DRY=0
[ "$MODE" = "--dry-run" ] && DRY=1
mkdir -p "$RESULTS"
echo "=== $(date -Is) gpu_check ($([ $DRY = 1 ] && echo dry run || echo GPU)), results in $RESULTS"

# ---- set-up: the carried wheels, installed beside the node's packages, never replacing its torch
for w in deepspeed $WHEELS; do
    ls "$WHEELS_DIR/${w//-/_}"-*.whl >/dev/null 2>&1 || ls "$WHEELS_DIR/$w"-*.whl >/dev/null 2>&1 \
        || { echo "error: no wheel for $w in $WHEELS_DIR/ (run tools/gpu_check.sh --fetch-wheels first)"; exit 2; }
done
if [ $DRY = 0 ]; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS_DIR"/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    # A dry run installs nothing: it checks that the wheels fit the node's Python and platform.
    $PYTHON -m pip install -q --no-index --no-deps --dry-run --target /tmp/gpu_check_site --only-binary=:all: \
        --python-version "${PY_VERSION:-3.12}" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$WHEELS_DIR"/*.whl
    export PYTHONPATH=$PWD
fi
$PYTHON - <<'EOF'
import torch
from tryon_ds.cli import require_dependencies
require_dependencies()
import deepspeed, webdataset  # noqa: F401
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      + (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)" if cuda else "no GPU"))
try:
    import xformers.ops  # noqa: F401
    print("xformers available")
except ImportError:
    print("xformers not available (no wheel for this torch in .whl/): its cases are reported as skipped")
EOF

status=0
# ---- 0. a step of every preset, where its time goes
step=(--json "$RESULTS/step.json" --attn-patch 2)
[ $DRY = 1 ] && step+=(--presets tiny-sr3 --steps 1)
$PYTHON tools/bench/step.py "${step[@]}" | tee "$RESULTS/step.txt" || status=1

# ---- 1. the matrix
matrix=(--gpu --ranks 1 --steps "$STEPS" --log-freq 10 --json "$RESULTS/matrix.json")
[ $DRY = 1 ] && matrix+=(--dry-run --steps 2)
$PYTHON tools/bench/train.py "${matrix[@]}" | tee "$RESULTS/matrix.txt" || status=1

# ---- 2. the trainer's fp16 path (the CPU has no fp16: the dry run takes bf16 and the tiny preset)
shards=$RESULTS/shards
if [ $DRY = 1 ]; then
    $PYTHON tools/make_shards.py --synthetic 64 --out "$shards" --image-size 32 --val-fraction 0.1 >/dev/null
    runs=("cpu_zero3:bf16"); preset=(--config configs/tiny.yaml); steps=2
else
    $PYTHON tools/make_shards.py --synthetic 512 --out "$shards" --image-size 128 --val-fraction 0.05 --workers 8 >/dev/null
    runs=("zero2_fp16:fp16" "zero3_fp16:fp16"); preset=(--config configs/config.json --set unet1.preset=base); steps=$STEPS
fi
for r in "${runs[@]}"; do
    ds=${r%%:*}; prec=${r##*:}
    log=$RESULTS/train_$ds.log
    start=$(date +%s)
    set +e
    $PYTHON tryon_ds/train.py --deepspeed_config "ds_configs/$ds.json" "${preset[@]}" --train_unet 1 \
        --max_steps "$steps" --batch_size 16 --set mixed_precision="$prec" --set data_dir="$shards" \
        --set checkpoint_dir="/tmp/gpu_check_ckpt/$ds" --set output_dir="$RESULTS/out_$ds" \
        --set log_dir="$RESULTS/logs" --set log_freq=10 --set validation_freq=100000 --set sample_freq="$steps" \
        --set checkpoint_freq=100000 --set data.num_workers=4 --set logging.wandb=disabled > "$log" 2>&1
    rc=$?
    set -e
    echo "train.py $ds ($prec): exit $rc in $(( $(date +%s) - start )) s; $(grep -c 'loss_scale=' "$log" || true) log line(s) with a loss scale"
    grep -E "step [0-9]+/|samples \(|error" "$log" | tail -4 || true
    [ $rc = 0 ] || status=1
    rm -rf "/tmp/gpu_check_ckpt/$ds"
done

# ---- 3. the shipped presets at their real size (the dry run: the tiny preset in fp32)
if [ "${REAL_SIZE:-1}" = 1 ]; then
    if [ $DRY = 1 ]; then presets=(tiny); prec=fp32; else presets=(base sr sr1024); prec=bf16; fi
    : > "$RESULTS/real_size.txt"
    for preset in "${presets[@]}"; do
        $PYTHON tools/bench/real_size.py --preset "$preset" --precision "$prec" --ranks 1 \
            --work "/tmp/gpu_check_real_size/$preset" 2>&1 | tail -6 | tee -a "$RESULTS/real_size.txt" \
            || status=1
        rm -rf "/tmp/gpu_check_real_size/$preset"
    done
fi

# ---- the JSON and the table
$PYTHON - "$RESULTS" <<'EOF'
import json, re, sys
from pathlib import Path
results = Path(sys.argv[1])
matrix = json.loads((results / "matrix.json").read_text()) if (results / "matrix.json").exists() else []
trainer = {}
for log in sorted(results.glob("train_*.log")):
    text = log.read_text()
    trainer[log.stem[len("train_"):]] = {
        "done": "done: unet1" in text,
        "loss_scales": [float(x) for x in re.findall(r"loss_scale=([0-9.e+-]+)", text)],
        "losses": [float(x) for x in re.findall(r" loss=([0-9.naif+-]+)", text)],
        "samples_per_s": [float(x) for x in re.findall(r"samples/s=([0-9.]+)", text)],
        "preview": re.findall(r"samples \(.*?\) in \S+ \((.*?)\)", text)}
(results / "gpu_check.json").write_text(json.dumps({"matrix": matrix, "trainer": trainer}, indent=1))
sys.path.insert(0, ".")
from tools.bench.train import table
lines = [(results / "step.txt").read_text().rstrip() if (results / "step.txt").exists() else "", "", table(matrix), ""]
for name, t in trainer.items():
    lines.append(f"train.py {name}: {'finished' if t['done'] else 'FAILED'}; losses {t['losses'][-3:]}; "
                 f"loss scale {t['loss_scales'][-1:] or 'n/a'}; samples/s {t['samples_per_s'][-1:]}; preview {t['preview']}")
if (results / "real_size.txt").exists():
    lines += ["", "real size (tools/bench/real_size.py):", (results / "real_size.txt").read_text().rstrip()]
(results / "gpu_check.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$RESULTS/gpu_check.json" "$RESULTS/gpu_check.txt" "$OUT/"; fi
echo "=== $(date -Is) gpu_check finished with status $status"
exit $status
