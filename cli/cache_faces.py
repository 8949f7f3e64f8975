"""`emo-cache check DATA` and `emo-cache faces DATA --out FACES.h5`: thin wrappers over pipeline stages."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from emotion_attention.cache.codecs import CODECS
from emotion_attention.cli.common import UserErrorCommand, split_classes
from emotion_attention.pipeline.configs import DecodeConfig, FaceConfig, PreprocessConfig
from emotion_attention.pipeline.core.runtime import usable_cores
from emotion_attention.pipeline.data.layouts import LAYOUTS
from emotion_attention.pipeline.stages.check import check_dataset
from emotion_attention.pipeline.stages.faces import preprocess_dataset

FACE_DEFAULTS, DECODE_DEFAULTS, RUN_DEFAULTS = FaceConfig(), DecodeConfig(), PreprocessConfig()


@click.command(cls=UserErrorCommand)
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--classes", default=None, help="Comma-separated class order (default: DATA/classes.txt, else AFEW's"
              " Angry,Disgust,Fear,Happy,Neutral,Sad,Surprise).")
@click.option("--layout", type=click.Choice(list(LAYOUTS)), default=None,
              help="Dataset layout (default: detected).")
@click.option("--quick", is_flag=True, help="Decode only each video's first frame (misses truncated videos).")
@click.option("--workers", type=int, default=None,
              help="Videos decoded in parallel (default: the cores this process may use).")
@click.option("--frame-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder a release's clips are read from when several hold them (default: found by content).")
def check(data: Path, classes: str | None, layout: str | None, quick: bool, workers: int | None,
          frame_root: Path | None) -> None:
    """Report clips per split x class (and per fold) and every problem (each naming its file); every video is
    decoded to the end, so a truncated or damaged one is an error. Exit 1 on errors, and when the dataset, a
    split or a fold yields no clip."""
    report = check_dataset(data, split_classes(classes), layout=layout, quick=quick,
                           workers=usable_cores() if workers is None else workers,
                           **({"frame_root": str(frame_root)} if frame_root else {}))
    click.echo(report.format())
    if not report.ok:
        sys.exit(1)


@click.command(cls=UserErrorCommand)
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Faces store to create or resume (.h5).")
@click.option("--workers", type=int, default=None,
              help="Clips processed in parallel (default: the cores this process may use).")
@click.option("--backend", type=click.Choice(["loky", "dask"]), default="loky", show_default=True)
@click.option("--scheduler", default=None, help="Dask scheduler address (with --backend dask), e.g. tcp://host:8786.")
@click.option("--classes", default=None, help="Comma-separated class order (default: DATA/classes.txt, else AFEW).")
@click.option("--fps-cap", type=float, default=DECODE_DEFAULTS.fps_cap,
              help="Keep at most this many frames per second (default: all).")
@click.option("--max-frames", type=int, default=DECODE_DEFAULTS.max_frames,
              help="Keep at most this many frames per clip (default: all).")
@click.option("--every-nth", type=int, default=DECODE_DEFAULTS.every_nth, show_default=True,
              help="Keep every Nth frame.")
@click.option("--size", type=int, default=FACE_DEFAULTS.size, show_default=True, help="Aligned chip side in pixels.")
@click.option("--padding", type=float, default=FACE_DEFAULTS.padding, show_default=True,
              help="Margin around dlib's mean-face template, share of its width per side.")
@click.option("--mode", type=click.Choice(["fast", "naive"]), default=FACE_DEFAULTS.mode, show_default=True,
              help="fast: downscaled detection + tracking; naive: full-resolution HOG on every frame.")
@click.option("--detect-width", type=int, default=FACE_DEFAULTS.detect_width, show_default=True,
              help="Width of the frame for the first detection pass.")
@click.option("--redetect-every", type=int, default=FACE_DEFAULTS.redetect_every, show_default=True,
              help="Tracked frames between forced detections.")
@click.option("--prealigned", type=click.Choice(["auto", "yes", "no"]), default=FACE_DEFAULTS.prealigned,
              show_default=True, help="Frame folders of aligned faces are only resized (auto: square images).")
@click.option("--predictor", "predictor_path", default=FACE_DEFAULTS.predictor_path,
              help="dlib 68-point model (default: from face-recognition-models).")
@click.option("--compression", type=click.Choice(["none", "lzf", "gzip"]), default="none", show_default=True,
              help="HDF5 compression of raw chips (--codec raw only).")
@click.option("--codec", type=click.Choice(CODECS), default=RUN_DEFAULTS.codec, show_default=True,
              help="How chips are stored: raw uint8, png (lossless) or jpeg; readers decode transparently.")
@click.option("--jpeg-quality", type=int, default=RUN_DEFAULTS.jpeg_quality, show_default=True,
              help="JPEG luma quality 1..100 (--codec jpeg).")
@click.option("--jpeg-chroma-quality", type=int, default=RUN_DEFAULTS.jpeg_chroma_quality, show_default=True,
              help="JPEG chroma quality 1..100 (--codec jpeg).")
@click.option("--shard", default=None, help="K/N: only shard K of N of the clips (0 <= K < N), into OUT of its own;"
              " join the shards with `emo-cache merge`.")
@click.option("--max-fail-fraction", type=float, default=RUN_DEFAULTS.max_fail_fraction, show_default=True,
              help="Exit non-zero when more than this share of clips fail.")
@click.option("--layout", type=click.Choice(list(LAYOUTS)), default=None,
              help="Dataset layout (default: detected).")
@click.option("--frame-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder a release's clips are read from when several hold them (default: found by content).")
@click.option("--task-frames", type=int, default=RUN_DEFAULTS.task_frames, show_default=True,
              help="Short clips are batched into worker tasks of about this many frames.")
@click.option("--stream-frames", type=int, default=RUN_DEFAULTS.stream_frames, show_default=True,
              help="Longer clips stream through a part file of their own (bounded memory); shorter ones travel"
                   " in memory. 0: every clip through a part file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def faces(data: Path, out: Path, workers: int, backend: str, scheduler: str | None, classes: str | None,
          fps_cap: float | None, max_frames: int | None, every_nth: int, size: int, padding: float, mode: str,
          detect_width: int, redetect_every: int, prealigned: str, predictor_path: str, compression: str,
          max_fail_fraction: float, codec: str, jpeg_quality: int, jpeg_chroma_quality: int, shard: str | None,
          layout: str | None, frame_root: Path | None, task_frames: int, stream_frames: int, quiet: bool) -> None:
    """Align every clip's faces into the faces store OUT (resumable; failures in OUT.failures.jsonl)."""
    face = FaceConfig(size=size, padding=padding, mode=mode, detect_width=detect_width,
                      redetect_every=redetect_every, prealigned=prealigned, predictor_path=predictor_path)
    cfg = PreprocessConfig(face=face, decode=DecodeConfig(fps_cap=fps_cap, max_frames=max_frames,
                                                          every_nth=every_nth),
                           class_names=split_classes(classes),
                           compression=None if compression == "none" else compression,
                           max_fail_fraction=max_fail_fraction, codec=codec, jpeg_quality=jpeg_quality,
                           jpeg_chroma_quality=jpeg_chroma_quality, task_frames=task_frames,
                           stream_frames=stream_frames)
    summary = preprocess_dataset(data, out, cfg, workers=workers, backend=backend, scheduler=scheduler,
                                 progress=not quiet, layout=layout, shard=shard,
                                 frame_root=str(frame_root) if frame_root else None)  # checks its arguments first
    click.echo(summary.format())
    if not summary.ok:
        sys.exit(1)
