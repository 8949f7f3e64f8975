"""The house's shape: layers that point one way (import-linter's contracts in .importlinter), only cache/
touches HDF5, and every import inside a function says why it is there."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "cli", "cache")


def test_import_linter_contracts_are_kept(tmp_path):
    """`lint-imports` on the package as it installs: the checkout's folders linked under emotion_attention/."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("lint-imports is missing: `pip install -e '.[dev]'` installs import-linter")
    root = tmp_path / "src" / "emotion_attention"
    root.mkdir(parents=True)
    for name in PACKAGES:
        (root / name).symlink_to(REPO / name)
    done = subprocess.run([str(lint), "--config", str(REPO / ".importlinter"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "src")},
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every import statement inside a function of ``path``."""
    lines = path.read_text().splitlines()
    found = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.append((node.lineno, " ".join(lines[node.lineno - 1:node.end_lineno])))
    return found


def test_imports_inside_functions_say_why():
    """An import inside a function keeps start-up cheap (torch, h5py, cv2, matplotlib ...) and says so in a
    comment; any other import belongs at the top of its module."""
    missing = [f"{path.relative_to(REPO)}:{line}: {text.strip()}"
               for name in PACKAGES for path in sorted((REPO / name).rglob("*.py"))
               for line, text in function_imports(path) if "#" not in text]
    assert not missing, "imports inside functions without a comment saying why:\n" + "\n".join(missing)


def test_only_cache_imports_h5py():
    offenders = [str(p.relative_to(REPO)) for name in ("pipeline", "cli") for p in (REPO / name).rglob("*.py")
                 if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                        any(a.name.split(".")[0] == "h5py" for a in n.names) or
                        isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "h5py"
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert offenders == []


def test_the_wheel_installs_one_top_level_package(tmp_path):
    """`pip wheel .` holds emotion_attention/ and its dist-info only: nothing generic (pipeline, cli, cache)
    lands at the top of site-packages, and every module of the checkout is in it."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's modules")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"emotion_attention", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    expected = {f"emotion_attention/{p.relative_to(REPO).as_posix()}" for name in PACKAGES
                for p in (REPO / name).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected <= set(names), sorted(expected - set(names))
