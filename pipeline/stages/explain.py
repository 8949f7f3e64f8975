"""Visual explanations: one Fig. 2-style figure per video and an HTML index over a split.

The figure follows the paper's Fig. 2 (Aminbeidokhti et al. 2019):
    (a) a few sampled frames (the aligned faces);
    (b) one row per attention head: the head's map over the L positions, upsampled from its
        sqrt(L) x sqrt(L) grid to the face ("whiter regions are more important");
    (c) per-frame class probabilities p(c | f, S), the chosen class in red;
    (d) temporal importance p(f | S), re-normalised to 0-100 % over the sampled frames, drawn
        under the p(f | S) curve of the whole clip.

Pure functions take arrays and return arrays or figures; only ``write_explanation`` and
``write_index`` touch the disk.
"""
from __future__ import annotations

import html
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote

import numpy as np
from tqdm import tqdm

from emotion_attention.cache import FacesStore, FeaturesStore
from emotion_attention.cache.common import diff_settings, flatten_settings, same_clip_diffs
from emotion_attention.cache.errors import StoreMismatch, clip_filename
from emotion_attention.pipeline.configs import ExplainConfig
from emotion_attention.pipeline.core.runtime import Failure, FailureLog
from emotion_attention.pipeline.core.stage import write_resolved_config

# Clip ids and class names are user text: "$" in them must stay a dollar, not start matplotlib's mathtext.
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


# -- pure computations ------------------------------------------------------------------------
def attention_heat(attention: np.ndarray, size: int) -> np.ndarray:
    """Upsample attention over L positions to a square ``size`` x ``size`` heat map in [0, 1].

    Arguments:
        attention: float (R, L) weights of R heads over L = g*g positions (row-major grid, as
            the backbone's (H/16, W/16) map is flattened).
        size: side of the face chip in pixels.
    Returns:
        float32 (R, size, size), each head scaled so that its peak is 1.

    >>> heat = attention_heat(np.eye(4)[None, 1], 8)[0]   # position 1 of a 2x2 grid: top right
    >>> bool(heat[:4, 4:].mean() > 3 * heat[4:, :4].mean())
    True
    """
    import torch  # lazy: torch is paid only when this runs
    import torch.nn.functional as F  # lazy: torch is paid only when this runs

    r, l = attention.shape
    g = math.isqrt(l)
    if g * g != l:
        raise ValueError(f"attention has L={l} positions, which is not a square grid")
    grid = torch.as_tensor(np.asarray(attention, np.float32)).reshape(r, 1, g, g)  # (R, 1, g, g)
    heat = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    peak = heat.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (heat / peak).numpy().astype(np.float32)


def overlay_heat(face: np.ndarray, heat: np.ndarray, floor: float = 0.25) -> np.ndarray:
    """Darken a face where a head does not look: whiter = attended, as in Fig. 2(b).

    Arguments:
        face: uint8 (S, S, 3) RGB aligned face.
        heat: float (S, S) in [0, 1].
        floor: brightness kept where heat is 0.
    Returns:
        uint8 (S, S, 3).

    >>> overlay_heat(np.full((2, 2, 3), 200, np.uint8), np.array([[1., 0], [0, 0]]), 0.0)[:, :, 0]
    array([[200,   0],
           [  0,   0]], dtype=uint8)
    """
    gain = floor + (1.0 - floor) * np.clip(heat, 0.0, 1.0)
    return np.clip(face.astype(np.float32) * gain[..., None], 0, 255).astype(np.uint8)


def frame_class_probs(frame_scores: np.ndarray) -> np.ndarray:
    """p(c | f, S): softmax over classes of each frame's scores; float (F, E) -> (F, E).

    Under temporal softmax pooling p(c, f | S) / p(f | S) is exactly this softmax.

    >>> frame_class_probs(np.zeros((1, 4))).tolist()
    [[0.25, 0.25, 0.25, 0.25]]
    """
    s = np.asarray(frame_scores, np.float64)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def choose_frames(frame_weights: np.ndarray, present: np.ndarray, k: int,
                  how: str = "even") -> np.ndarray:
    """Positions of up to ``k`` present frames to show, in time order.

    Arguments:
        frame_weights: float (F,) p(f | S).
        present: bool (F,).
        k: how many.
        how: "even" spreads them over the clip; "top" takes the highest p(f | S).
    Returns:
        int64 (K,) with K = min(k, present.sum()).

    >>> choose_frames(np.ones(10) / 10, np.ones(10, bool), 3).tolist()
    [0, 4, 9]
    """
    idx = np.flatnonzero(present)
    if len(idx) <= k:
        return idx.astype(np.int64)
    if how == "top":
        top = idx[np.argsort(-np.asarray(frame_weights)[idx], kind="stable")[:k]]
        return np.sort(top).astype(np.int64)
    picks = np.linspace(0, len(idx) - 1, k).round().astype(np.int64)
    return idx[picks].astype(np.int64)


def renormalised_importance(frame_weights: np.ndarray) -> np.ndarray:
    """Fig. 2(d): p(f | S) of the shown frames rescaled to 0-100 % (min -> 0, max -> 100).

    >>> renormalised_importance(np.array([0.0, 0.4, 0.2])).tolist()
    [0.0, 100.0, 50.0]
    """
    w = np.asarray(frame_weights, np.float64)
    span = w.max() - w.min() if len(w) else 0.0
    return np.full_like(w, 100.0) if span <= 0 else (w - w.min()) / span * 100.0


# -- the figure -------------------------------------------------------------------------------
def explanation_figure(faces: np.ndarray, present: np.ndarray, frame_probs: np.ndarray,
                       frame_weights: np.ndarray, video_probs: np.ndarray,
                       class_names: Sequence[str], attention: Optional[np.ndarray] = None,
                       title: str = "", true_label: Optional[str] = None,
                       head_names: Optional[Sequence[str]] = None,
                       frame_numbers: Optional[np.ndarray] = None,
                       cfg: ExplainConfig = ExplainConfig()):
    """Build the Fig. 2-style figure of one video (a matplotlib Figure, Agg, not saved).

    Arguments:
        faces: uint8 (F, S, S, 3) RGB aligned faces of the clip.
        present: bool (F,); absent frames are never shown.
        frame_probs: float (F, E) per-frame class probabilities p(c | f, S) (``frame_class_probs``
            of the scores; ``pipeline.evaluate.predict_video`` returns them as ``frame_probs``).
        frame_weights: float (F,) p(f | S).
        video_probs: float (E,) p(c | S); its argmax is the chosen class.
        class_names: E names.
        attention: float (F, R, L) spatial attention, or None for models without it.
        title: shown on top (for example the clip id).
        true_label: the label, when known; the title says whether the prediction is right.
        head_names: row labels of the attention rows (default "head 1", "head 2", ...).
        frame_numbers: int (F,) frame index in the source video, for the titles (default 0..F-1).
        cfg: layout settings.
    Returns:
        matplotlib.figure.Figure. Axes carry labels "face/k", "head{r}/k", "probs/k" and
        "importance" so that tests and callers can find them.

    >>> fig = explanation_figure(faces, present, probs_f, weights, probs, names, attn)  # doctest: +SKIP
    >>> write_explanation("clip.png", fig)  # doctest: +SKIP
    """
    import matplotlib  # lazy: matplotlib is paid only when this runs

    with matplotlib.rc_context(PLAIN_TEXT):
        return _explanation_figure(faces, present, frame_probs, frame_weights, video_probs, class_names, attention,
                                   title, true_label, head_names, frame_numbers, cfg)


def _explanation_figure(faces, present, frame_probs, frame_weights, video_probs, class_names, attention, title,
                        true_label, head_names, frame_numbers, cfg: ExplainConfig):
    from matplotlib.figure import Figure  # lazy: matplotlib is paid only when this runs

    cfg.validate()
    chosen = int(np.argmax(video_probs))
    shown = choose_frames(frame_weights, present, cfg.frames_shown, cfg.frame_choice)
    n_heads = 0 if attention is None else attention.shape[1]
    n_columns = max(1, len(shown))
    width_in, height_in = cfg._figure_inches(n_heads, n_columns)
    fig = Figure(figsize=(width_in, height_in), dpi=cfg.dpi)
    ratios = [cfg.column_inches] * (1 + n_heads) + [1.6, 1.4]
    grid = fig.add_gridspec(len(ratios), n_columns, height_ratios=ratios,
                            left=0.6 / width_in, right=1 - 0.3 / width_in, top=1 - 0.9 / height_in,
                            bottom=0.35 / height_in, hspace=0.35, wspace=0.08)
    names = list(head_names) if head_names else [f"head {r + 1}" for r in range(n_heads)]
    numbers = np.arange(len(present)) if frame_numbers is None else np.asarray(frame_numbers)
    _draw_faces(fig, grid, faces, shown, numbers, attention, names, cfg)
    _draw_frame_probs(fig, grid, np.asarray(frame_probs), shown, chosen, class_names, n_heads, cfg)
    _draw_importance(fig, grid[-1, :], frame_weights, present, shown)
    verdict = "" if true_label is None else (
        f"  label {true_label}: " + ("correct" if class_names[chosen] == true_label else "WRONG"))
    fig.suptitle(f"{title}\npredicted {class_names[chosen]} (p={video_probs[chosen]:.2f}){verdict}",
                 fontsize=10)
    return fig


def _draw_faces(fig, grid, faces, shown, numbers, attention, head_names, cfg: ExplainConfig) -> None:
    n_heads = 0 if attention is None else attention.shape[1]
    for k, f in enumerate(shown):
        ax = fig.add_subplot(grid[0, k], label=f"face/{k}")
        ax.imshow(faces[f])
        ax.set_title(f"frame {numbers[f]}", fontsize=8)
        _no_ticks(ax, "(a) frames" if k == 0 else None)
        if attention is None:
            continue
        heat = attention_heat(attention[f], faces.shape[1])  # (R, S, S)
        for r in range(n_heads):
            ax = fig.add_subplot(grid[1 + r, k], label=f"head{r}/{k}")
            ax.imshow(overlay_heat(faces[f], heat[r], cfg.heat_floor))
            _no_ticks(ax, f"(b) {head_names[r]}" if k == 0 else None)


def _draw_frame_probs(fig, grid, probs, shown, chosen, class_names, n_heads, cfg) -> None:
    e = min(len(class_names), cfg.max_classes_shown)
    colours = ["tab:red" if c == chosen else "0.6" for c in range(e)]
    for k, f in enumerate(shown):
        ax = fig.add_subplot(grid[1 + n_heads, k], label=f"probs/{k}")
        ax.barh(np.arange(e), probs[f, :e], color=colours)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_yticks(np.arange(e))
        ax.set_yticklabels([n[:3] for n in class_names[:e]] if k == 0 else [], fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
        if k == 0:
            ax.set_ylabel("(c) p(c|f)", fontsize=8)


def _draw_importance(fig, cell, frame_weights, present, shown) -> None:
    ax = fig.add_subplot(cell, label="importance")
    n = len(frame_weights)
    ax.bar(np.arange(n), np.where(present, frame_weights, 0.0), color="0.75", width=1.0,
           label="p(f|S), all frames")
    top = float(np.max(frame_weights)) if n else 1.0
    pct = renormalised_importance(np.asarray(frame_weights)[shown]) if len(shown) else []
    ax.bar(shown, np.asarray(frame_weights)[shown], color="tab:red", width=max(1.0, n / 120),
           label="shown frames")
    ax.vlines(shown, 0, top * 1.3, colors="tab:red", linewidth=0.6, linestyles=":")  # findable on long clips
    for f, p in zip(shown, pct):
        ax.annotate(f"{p:.0f}%", (f, frame_weights[f]), xytext=(0, 2), textcoords="offset points",
                    ha="center", fontsize=7)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(0, top * 1.3 + 1e-12)
    ax.set_xlabel("decoded frame (position in the clip)", fontsize=8)
    ax.set_ylabel("(d) p(f|S)", fontsize=8)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)


def _no_ticks(ax, ylabel: Optional[str]) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)


def figure_to_rgb(fig) -> np.ndarray:
    """Render a figure with Agg; uint8 (H, W, 3).

    >>> from matplotlib.figure import Figure
    >>> figure_to_rgb(Figure(figsize=(2, 1), dpi=50)).shape
    (50, 100, 3)
    """
    import matplotlib  # lazy: matplotlib is paid only when this runs
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is paid only when this runs

    canvas = FigureCanvasAgg(fig)
    with matplotlib.rc_context(PLAIN_TEXT):
        canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# -- the HTML index ---------------------------------------------------------------------------
_INDEX_JS = """
function sortBy(col, dir) {
  const body = document.querySelector('#videos tbody');
  const numeric = document.querySelectorAll('#videos th')[col].dataset.numeric == '1';
  const rows = Array.from(body.rows);
  dir = dir || (body.dataset.col == col && body.dataset.dir == 'asc' ? 'desc' : 'asc');
  rows.sort((a, b) => {
    let x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
    if (numeric) { x = parseFloat(x); y = parseFloat(y); }
    const c = x < y ? -1 : x > y ? 1 : 0;
    return dir == 'asc' ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
  body.dataset.col = col; body.dataset.dir = dir;
}
// index.html#sort=confidence-desc (or correct-asc, video-asc ...) opens the page sorted
window.addEventListener('DOMContentLoaded', () => {
  const m = location.hash.match(/sort=([a-z]+)-(asc|desc)/);
  if (!m) return;
  const names = Array.from(document.querySelectorAll('#videos th')).map(th => th.textContent);
  if (names.indexOf(m[1]) >= 0) sortBy(names.indexOf(m[1]), m[2]);
});
"""

_INDEX_CSS = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; }
th { cursor: pointer; background: #eee; }
tr.wrong td.verdict { color: #b00; font-weight: bold; }
tr.right td.verdict { color: #070; }
img.thumb { height: 90px; }
"""

INDEX_COLUMNS = ("video", "label", "predicted", "confidence", "correct", "figure")


def index_html(rows: Sequence[dict], title: str = "Explanations") -> str:
    """An HTML page listing every video, sortable by clicking a column header (inline JS).

    Opening ``index.html#sort=confidence-desc`` (any column name, ``-asc`` or ``-desc``) shows it
    sorted; ``#sort=correct-asc`` puts the wrong predictions first.

    Arguments:
        rows: one dict per video with keys ``video`` (id), ``label`` (true label or None),
            ``predicted``, ``confidence`` (p of the predicted class) and ``figure`` (path of
            the PNG relative to the page).
        title: page title.
    Returns:
        the page as text.

    >>> "Train/Happy/a.mp4" in index_html([{"video": "Train/Happy/a.mp4", "label": "Happy",
    ...     "predicted": "Sad", "confidence": 0.4, "figure": "figures/a.png"}])
    True
    """
    numeric = {"confidence", "correct"}
    head = "".join(f'<th data-numeric="{int(c in numeric)}" onclick="sortBy({i})">{c}</th>'
                   for i, c in enumerate(INDEX_COLUMNS))
    body = "\n".join(_index_row(r) for r in rows)
    n_right = sum(1 for r in rows if r.get("label") is not None and r["label"] == r["predicted"])
    n_known = sum(1 for r in rows if r.get("label") is not None)
    summary = f"{len(rows)} videos" + (f", {n_right}/{n_known} correct" if n_known else "")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_INDEX_CSS}</style><script>{_INDEX_JS}</script></head>\n<body>"
            f"<h1>{html.escape(title)}</h1><p>{summary}. Click a column header to sort"
            f" (or open <code>index.html#sort=confidence-desc</code>).</p>\n"
            f"<table id='videos'><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
            f"</body></html>\n")


def _index_row(r: dict) -> str:
    label = r.get("label")
    correct = None if label is None else int(label == r["predicted"])
    verdict = {None: "?", 1: "right", 0: "wrong"}[correct]
    fig = html.escape(quote(str(r["figure"])), quote=True)  # file names hold "%": the URL must quote it again
    cells = [
        (r["video"], html.escape(str(r["video"]))),
        (label or "", html.escape(str(label or "—"))),
        (r["predicted"], html.escape(str(r["predicted"]))),
        (f"{r['confidence']:.6f}", f"{r['confidence']:.3f}"),
        ("-1" if correct is None else str(correct), verdict),
        (fig, f"<a href='{fig}'><img class='thumb' src='{fig}' alt='figure'></a>"),
    ]
    tds = "".join(f"<td data-v='{html.escape(str(v), quote=True)}'"
                  + (" class='verdict'" if i == 4 else "") + f">{text}</td>"
                  for i, (v, text) in enumerate(cells))
    cls = {None: "unknown", 1: "right", 0: "wrong"}[correct]
    return f"<tr class='{cls}'>{tds}</tr>"


def figure_name(video_id: str) -> str:
    """File name of a video's figure; injective over clip ids (``cache.errors.clip_filename``).

    >>> figure_name("Val/Sad/000123.avi"), figure_name("Val/Sad/a b.avi"), figure_name("Val/Sad/a_b.avi")
    ('Val%2FSad%2F000123.avi.png', 'Val%2FSad%2Fa%20b.avi.png', 'Val%2FSad%2Fa_b.avi.png')
    """
    return clip_filename(video_id, ".png")


# -- stage side (files) -----------------------------------------------------------------------
def write_explanation(path, fig) -> Path:
    """Save a figure as PNG (Agg) and return its path."""
    import matplotlib  # lazy: matplotlib is paid only when this runs
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is paid only when this runs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(PLAIN_TEXT):  # tick labels are made at draw time
        FigureCanvasAgg(fig).print_png(str(path))
    return path


def write_index(out_dir, rows: Sequence[dict], title: str = "Explanations",
                cfg: Optional[ExplainConfig] = None) -> Path:
    """Write ``index.html`` (and, with ``cfg``, the resolved ``config.json``) into ``out_dir``; returns the page."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "index.html"
    page.write_text(index_html(rows, title))
    if cfg is not None:
        write_resolved_config(out_dir, "explain", [], {"config": asdict(cfg)})
    return page


def explain_evaluation(faces_path, records: Sequence[dict], class_names: Sequence[str], out_dir,
                       features_path=None, title: str = "Explanations",
                       cfg: ExplainConfig = ExplainConfig(), progress: bool = True, log=print) -> Path:
    """Stage: a figure per evaluated clip (pixels from the faces store) and an index over them.

    Arguments:
        faces_path: the faces store the features were made from (it holds the pixels).
        records: ``pipeline.evaluate.evaluate(...)["records"]``: clip_id, label (index), probs, pred,
            frame_weights, frame_probs, attention per clip.
        class_names: the checkpoint's classes.
        out_dir: gets figures/<clip>.png, index.html, explain_config.json, and failures.jsonl when a figure
            cannot be written (that clip's figure only is missing; the others are written).
        features_path: the features store that was evaluated. A faces store made with other settings (its
            differing settings are named) or that is not the one these features came from (a clip missing, or
            of another source file, length or rate) is refused before any figure is drawn.
        title: page title.
        cfg: ExplainConfig.
        progress: show a tqdm bar.
        log: where a figure that cannot be written is reported.
    Returns:
        the path of index.html.

    >>> m = evaluate("feats.h5", "best.pt", "Val")  # doctest: +SKIP
    >>> explain_evaluation("faces.h5", m["records"], names, "runs/eval/explain", "feats.h5")  # doctest: +SKIP
    """

    cfg.validate()
    out_dir = Path(out_dir)
    rows, lost = [], []
    source_rows: dict = {}  # clip id -> the faces-store frames its feature rows hold (--frames-per-clip)
    if features_path is not None:
        check_explain_faces(faces_path, features_path, [rec["clip_id"] for rec in records])
        with FeaturesStore(features_path, "r") as feats:
            if feats.provenance.get("frames_per_clip") is not None:
                source_rows = {rec["clip_id"]: feats.source_rows(rec["clip_id"]) for rec in records}
    with FacesStore(faces_path, "r") as store:
        for rec in tqdm(records, desc="explain", unit="clip", disable=not progress):
            try:
                rows.append(_explain_record(store, rec, class_names, out_dir, cfg, source_rows.get(rec["clip_id"])))
            except OSError as exc:  # this figure only (a name or a disk the system refuses); the others go on
                reason = f"could not write its figure ({exc.strerror or exc})"
                lost.append(Failure("explain", str(faces_path), rec["clip_id"], f"{type(exc).__name__}: {reason}"))
                log(f"warning: {rec['clip_id']}: {reason}; the other figures are written")
    if lost:
        with FailureLog(out_dir / "failures.jsonl") as flog:
            for failure in lost:
                flog.add(failure)
    return write_index(out_dir, rows, title=title, cfg=cfg)


def check_explain_faces(faces_path, features_path, clip_ids: Optional[Sequence[str]] = None) -> None:
    """Refuse (StoreMismatch), before any work, a faces store that is not the one ``features_path`` was made
    from (``check_faces_made_features``), checked over ``clip_ids`` (None: every complete clip of the features).

    >>> check_explain_faces("faces.h5", "feats.h5")  # doctest: +SKIP
    """

    with FeaturesStore(features_path, "r") as feats:
        ids = feats.complete_ids() if clip_ids is None else list(clip_ids)
        made_from = (feats.provenance.get("faces_fingerprint"), feats.faces_config,
                     {cid: feats.attrs(cid) for cid in ids})
    with FacesStore(faces_path, "r") as store:
        check_faces_made_features(store, faces_path, features_path, *made_from)




def check_faces_made_features(store, faces_path, features_path, fingerprint: Optional[str],
                              faces_config: Optional[dict], clip_attrs: dict) -> None:
    """StoreMismatch unless ``store`` is the faces store the features were made from, checked before any figure.

    Made with other settings: each differing setting is named with both values (the features record the
    settings of their faces store; older stores only its fingerprint). Same settings but another dataset:
    a clip the features hold is missing from ``store``, or comes from another source file (name), length or
    rate; the clip and each differing value are named.
    """
    fix = f"pass the faces store given to `emo-cache extract` for {features_path} with --faces"
    if fingerprint is not None and store.fingerprint != fingerprint:

        if faces_config is not None:
            diffs = diff_settings(faces_config, store.config, have="the features' faces store has",
                                  want="this one has")
        else:
            diffs = [f"fingerprint: the features' faces store has {fingerprint[:12]}..., this one has"
                     f" {store.fingerprint[:12]}... ({features_path} predates recorded faces settings; this"
                     f" store's: {_settings_line(store.config)})"]
        raise StoreMismatch(f"{faces_path}: is not the faces store the features in {features_path} were made from;"
                            " its settings differ:\n  " + "\n  ".join(diffs) + f"\n{fix}")
    for cid, want in clip_attrs.items():
        if not store.is_complete(cid):
            raise StoreMismatch(f"{faces_path}: not the faces store these features came from ({features_path}"
                                f" holds clip {cid!r}, this store does not); {fix}")
        diffs = same_clip_diffs(want, store.attrs(cid))
        if diffs:
            raise StoreMismatch(f"{faces_path}: not the faces store these features came from (clip {cid!r}"
                                f" differs from the one in {features_path}):\n  " + "\n  ".join(diffs) + f"\n{fix}")


def _settings_line(config: dict, limit: int = 12) -> str:
    items = [f"{k}={v!r}" for k, v in sorted(flatten_settings(config).items()) if k != "class_names"]
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def _explain_record(store, rec: dict, class_names: Sequence[str], out_dir: Path, cfg: ExplainConfig,
                    source_rows: Optional[np.ndarray] = None) -> dict:
    cid = rec["clip_id"]
    meta = store.read_meta(cid)
    faces = store.read_faces(cid, source_rows)  # source_rows None: every frame
    if source_rows is not None:  # the features keep only some frames (--frames-per-clip): show those
        meta = {k: v[source_rows] for k, v in meta.items()}
    used = np.zeros(len(meta["present"]), bool)
    used[np.asarray(rec["frames"], dtype=np.int64)] = True  # frames the model saw (present ones)
    label = class_names[rec["label"]] if rec.get("label") is not None else None
    fig = explanation_figure(faces, used, rec["frame_probs"], rec["frame_weights"], rec["probs"], class_names,
                             rec.get("attention"), title=cid, true_label=label,
                             frame_numbers=meta["frame_index"], cfg=cfg)
    name = "figures/" + figure_name(cid)
    write_explanation(out_dir / name, fig)
    return {"video": cid, "label": label, "predicted": class_names[rec["pred"]],
            "confidence": float(np.max(rec["probs"])), "figure": name}
