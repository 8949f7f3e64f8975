"""Issue 19, case 2: the disk fills (another process takes the last byte) while `emo-cache faces --workers 1`
has a clip in flight. It must end as the two-worker run does: one line naming the store, exit 1, committed
clips kept, and a rerun after freeing space finishes (no traceback, no "Couldn't delete link", no salvage).

The disk is a small tmpfs mounted in a private mount namespace (`unshare -rm`), so no root is needed and nothing
leaks; the test is skipped, with the reason, where such a namespace is not allowed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import numpy as np
import pytest

from emotion_attention.cache import FacesStore
from faultkit import CHAIN_CLIPS, PY, REPO, SAMPLES

FILL_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from pathlib import Path
    import h5py
    ds, disk, keep, workers = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
    out = disk / "faces.h5"
    exe = str(Path(sys.executable).with_name("emo-cache"))
    cmd = [exe, "faces", str(ds), "--out", str(out), "--workers", workers, "--max-frames", "200", "--quiet"]
    env = {**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"}   # so this script can peek while faces writes

    def committed():
        try:
            with h5py.File(out, "r", locking=False) as f:
                return sum(bool(f[k].attrs.get("complete", False)) for k in f)
        except Exception:
            return 0

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not committed():
        time.sleep(0.05)
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # take every byte left, as another process would
    for block in (1 << 20, 1 << 12, 1):
        try:
            while True:
                os.write(fd, b"\\0" * block)
        except OSError:
            pass
    os.close(fd)
    stdout, stderr = proc.communicate(timeout=300)
    report = {"rc": proc.returncode, "text": stdout + stderr}
    (disk / "filler").unlink()
    with h5py.File(out, "r") as f:
        report["committed"] = sorted(k for k in f if f[k].attrs.get("complete", False))
    os.system(f"cp {out} {keep / 'after_full.h5'}")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report["rerun_rc"], report["rerun_text"] = again.returncode, again.stdout + again.stderr
    os.system(f"cp {out} {keep / 'resumed.h5'}")
    print("REPORT", json.dumps(report))
""")


def namespace_allowed() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-rm", "true"]).returncode == 0


@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.slow)])  # 2 held before the fix
def test_a_disk_filled_by_another_process_mid_clip_stops_cleanly_and_a_rerun_finishes(tmp_path, workers):
    if not namespace_allowed():
        pytest.skip("cannot mount a small tmpfs here: `unshare -rm` (user + mount namespaces) is not allowed")
    ds = tmp_path / "ds"
    for cid, sample in CHAIN_CLIPS.items():
        (ds / cid).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLES / sample, ds / cid)
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["unshare", "-rm", PY, "-c", FILL_SCRIPT, str(ds), str(disk), str(tmp_path), workers],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    text = report["text"]
    assert report["rc"] == 1 and "Traceback" not in text and "Error: " in text, text[-3000:]
    assert str(disk / "faces.h5") in text and "rerun the same command" in text
    assert 1 <= len(report["committed"]) < len(CHAIN_CLIPS), report["committed"]
    assert report["rerun_rc"] == 0, report["rerun_text"][-3000:]
    assert "Couldn't delete link" not in report["rerun_text"]
    with FacesStore(tmp_path / "after_full.h5") as before, FacesStore(tmp_path / "resumed.h5") as after:
        assert after.complete_ids() == sorted(CHAIN_CLIPS)
        for cid in before.complete_ids():                       # what was committed is kept, unchanged
            assert np.array_equal(before.read_faces(cid), after.read_faces(cid))
