"""The documentation stays true: the MkDocs site builds with --strict (no broken page or anchor link) and the
README stays a short landing page whose links into docs/ resolve."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 15 * 1024  # bytes: a landing page, not the manual
STAGE_COMMANDS = ("emo-cache check", "emo-cache faces", "emo-cache extract", "emo-train heads",
                  "emo-train finetune", "emo-eval", "emo-train cv", "emo-train ablate", "emo-predict")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``config`` into ``site``; stdout and stderr together."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, cwd=config.parent)


def copy_docs(dest: Path) -> Path:
    """A copy of mkdocs.yml and docs/ (without docs/_incoming) to break on purpose; returns the config path."""
    shutil.copy(ROOT / "mkdocs.yml", dest / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", dest / "docs", ignore=shutil.ignore_patterns("_incoming"))
    return dest / "mkdocs.yml"


def test_site_builds_strict_without_warnings(tmp_path):
    site = tmp_path / "site"
    result = build(ROOT / "mkdocs.yml", site)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    pages = {p.relative_to(ROOT / "docs").with_suffix("") for p in (ROOT / "docs").glob("*.md")}
    assert {"index", "stages", "datasets", "stores", "benchmarks", "gpus", "reliability", "layout"} <= \
        {str(p) for p in pages}
    for page in pages:
        html = site / ("index.html" if str(page) == "index" else f"{page}/index.html")
        assert html.is_file(), f"{page}.md was not built"
    assert not (site / "_incoming").exists()


def test_strict_build_fails_on_broken_links(tmp_path):
    config = copy_docs(tmp_path)
    broken = {"missing.md": "is not found among documentation files",
              "stages.md#no-such-anchor": "does not contain an anchor '#no-such-anchor'",
              "#no-anchor-here": "there is no such anchor on this page",
              "/absolute/page": "contains an absolute link",
              "../README.md": "is not found among documentation files"}
    with open(config.parent / "docs" / "index.md", "a") as fh:
        fh.write("\n" + " ".join(f"[link {i}]({target})" for i, target in enumerate(broken)) + "\n")
    result = build(config, tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    for target, message in broken.items():
        line = next((ln for ln in output.splitlines() if f"'{target}'" in ln), "")
        assert message in line, f"no warning for {target!r}:\n{output}"


def test_incoming_notes_are_not_built(tmp_path):
    config = copy_docs(tmp_path)
    incoming = config.parent / "docs" / "_incoming"
    incoming.mkdir()
    (incoming / "note.md").write_text("# A note\n\n[not yet a page](nowhere.md)\n")
    result = build(config, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "site" / "_incoming").exists()


def test_readme_is_a_short_landing_page():
    readme = (ROOT / "README.md").read_text()
    assert (ROOT / "README.md").stat().st_size <= README_LIMIT
    commands = re.search(r"```\n(.*?)```", readme, re.S).group(1)  # the first code block: the two commands
    assert re.search(r"^make demo +# ", commands, re.M) and re.search(r"^make test +# ", commands, re.M), commands
    for command in STAGE_COMMANDS:
        assert f"`{command}" in readme, f"README has no line for {command}"


def test_readme_links_into_docs_resolve():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", readme)
    assert len(set(links)) >= 6, links
    for link in links:
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
        assert "_incoming" not in link
