"""The documentation: every relative link in README.md and docs/*.md resolves (its file, and its
#anchor as GitHub makes heading anchors), the README stays a start page, and the command list
names every command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, without punctuation (word
    characters, spaces and hyphens stay), spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    """The targets of the page's links outside code (inline code spans left out)."""
    found: list[str] = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        found += LINK.findall(INLINE_CODE.sub("``", line))
    return found


def test_slug_matches_github() -> None:
    assert slug("4. What a write guarantees: crash safety") == "4-what-a-write-guarantees-crash-safety"
    assert slug("SmolLM2-135M: the llama family's defaults") == "smollm2-135m-the-llama-familys-defaults"
    assert slug("Table 2 on SmolLM2: sequential editing") == "table-2-on-smollm2-sequential-editing"
    assert slug("Disabling edits: the screen") == "disabling-edits-the-screen"
    assert slug("`rrome tune` and `best.json`") == "rrome-tune-and-bestjson"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    bad: list[str] = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_is_a_start_page() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_readme_lists_every_command() -> None:
    import click

    from rrome.cli import main

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert isinstance(main, click.Group)
    listed = set(re.findall(r"^- `rrome ([a-z-]+)[` ]", text, re.MULTILINE))
    missing = [name for name in main.list_commands(click.Context(main)) if name not in listed]
    assert not missing, f"commands the README's command list leaves out: {missing}"


def test_no_machine_paths_in_tracked_files() -> None:
    """The shared data folder is named relative to the checkout (../shared/data), never by one
    machine's absolute path."""
    needle = "/" + "work" + "/"
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(
        ["git", "grep", "-n", "-I", "-F", needle], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout or proc.stderr
