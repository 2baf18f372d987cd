"""The documentation's promises that a reader acts on: README.md, CHANGELOG.md and docs/*.md.

Every relative link points at a file that exists (and at a heading of it, when it names one),
every ``make TARGET`` they name is a target
of the Makefile, every ``python -m cellseg.NAME`` names a module cellseg has, and the README
stays short (the rest belongs in docs/).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
MAKE = re.compile(r"(?:^|[\s;&|(`])make((?:[ \t]+\S+)+)", re.M)
PYTHON_M = re.compile(r"-m\s+cellseg\.([A-Za-z_][\w.]*)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def _code(text: str) -> str:
    """The text of the fenced blocks and inline code spans, where commands are written."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    spans = [m.group(2) for m in CODE_SPAN.finditer(FENCE.sub("", text))]
    return "\n".join(blocks + spans)


def anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``doc``: lower case, punctuation dropped, spaces
    as hyphens, a repeated heading numbered (``-1``, ``-2``, ...)."""
    found: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", doc.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+)[ \t]*:(?!=)", text, re.M))


def make_targets_named(text: str) -> set[str]:
    """The target of each ``make ...`` command in the code of ``text`` (options and VAR=value
    assignments skipped)."""
    found = set()
    for match in MAKE.finditer(_code(text)):
        for word in match.group(1).split():
            if word.startswith("#"):
                break
            if word.startswith("-") or "=" in word:
                continue
            found.add(word.strip("`'\".,;:)"))
            break
    return found


def test_docs_exist():
    assert (ROOT / "README.md").is_file()
    assert len(DOCS) > 3, "docs/*.md pages are missing"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_relative_links_exist(doc: Path):
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    text = CODE_SPAN.sub("", text)
    missing = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s), mailto ...; an anchor in the same page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (doc.parent / path).exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_link_anchors_exist(doc: Path):
    """A link to a heading (``page.md#heading``, ``#heading``) finds that heading: moving a
    section breaks no link silently."""
    text = CODE_SPAN.sub("", FENCE.sub("", doc.read_text(encoding="utf-8")))
    missing = []
    for target in LINK.findall(text):
        path, _, anchor = target.partition("#")
        if not anchor or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue
        page = (doc.parent / path) if path else doc
        if page.suffix == ".md" and page.is_file() and anchor not in anchors(page):
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)} links to headings that are not there: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_make_targets_exist(doc: Path):
    known = makefile_targets()
    unknown = make_targets_named(doc.read_text(encoding="utf-8")) - known
    assert not unknown, f"{doc.relative_to(ROOT)} names make targets the Makefile lacks: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_python_m_modules_exist(doc: Path):
    missing = []
    for name in set(PYTHON_M.findall(doc.read_text(encoding="utf-8"))):
        parts = name.rstrip(".").split(".")
        base = ROOT / "src" / "cellseg" / Path(*parts)
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            missing.append(f"cellseg.{'.'.join(parts)}")
    assert not missing, f"{doc.relative_to(ROOT)} runs modules cellseg lacks: {missing}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


def test_checks_find_what_they_look_for(tmp_path: Path):
    """The parsers themselves: a link, a make target and a module are found where written."""
    text = "See [a](docs/x.md#y) and ![b](img.png).\n\n```bash\nmake sweep DATA=dsb2018\n```\n"
    text += "`make -j2 DSB2018=none compare`, to make it so; `python -m cellseg.train`\n"
    assert LINK.findall(text) == ["docs/x.md#y", "img.png"]
    assert make_targets_named(text) == {"sweep", "compare"}
    assert PYTHON_M.findall(text) == ["train"]
    page = tmp_path / "page.md"
    page.write_text("# The model: `nuclei`\n\n## Scores\n\n### Scores\n\n## 0.5× gap, again\n"
                    "```\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(page) == {"the-model-nuclei", "scores", "scores-1", "05-gap-again"}
    assert {"train", "test", "help"} <= makefile_targets()
