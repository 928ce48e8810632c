"""The documentation's links hold: every relative link in README.md, CONTRIBUTING.md and docs/*.md
names a file that exists, and every `#anchor` (in the page or in another page) names a heading there,
slugged as GitHub slugs headings. Code that points readers to a page (`docs/NAME.md#anchor` in an
error message, a docstring, a comment) is held to the same rule."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"`(?:[^`\n]|\n(?![ \t]*\n))*`")  # a code span may wrap, never across a blank line
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^[ \t]{0,3}\[[^\]\n]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+\"[^\"\n]*\")?[ \t]*$", re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")
CODE_REFERENCE = re.compile(r"\bdocs/([\w.-]+\.md)(#[\w-]+)?")
README_SECTION = re.compile(r"README\W{0,3}[\"'“‘][A-Z]")
"""A pointer into a README section by its name (`README "GPU check"`): sections live in docs/ now."""


def _blank_fences(text: str) -> list[str]:
    """The lines of `text` with fenced code blocks emptied (line numbers kept)."""
    lines = text.split("\n")
    out, fence = [], ""
    for line in lines:
        m = FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = ""
            out.append("")
        elif m:
            fence = m.group(1)
            out.append("")
        else:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: the rendered text, lowercased, every character but
    letters, marks, digits, connector punctuation (`_`), hyphens and spaces dropped, spaces -> hyphens."""
    text = re.sub(r"!?\[((?:[^\]\\]|\\.)*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_, not snake_case
    kept = []
    for ch in text.lower():
        category = unicodedata.category(ch)
        if ch in " -" or category[0] in "LMN" or category == "Pc":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown page; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in _blank_fences(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition outside code."""
    prose = "\n".join(_blank_fences(text))
    prose = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)  # keep offsets and lines
    found = [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in INLINE_LINK.finditer(prose)]
    found += [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in REFERENCE.finditer(prose)]
    return sorted(found)


@dataclass(frozen=True)
class Dead:
    page: Path
    line: int
    target: str
    why: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.target} ({self.why})"


def check_target(page: Path, target: str, line: int = 0) -> Dead | None:
    """Why `target`, linked from `page`, leads nowhere; None when it resolves (or is not relative)."""
    if not target or SCHEME.match(target):
        return None
    path, _, anchor = target.partition("#")
    dest = page if not path else (page.parent / path)
    if not dest.exists():
        return Dead(page, line, target, f"no file {dest}")
    if anchor:
        if dest.is_dir() or dest.suffix.lower() != ".md":
            return Dead(page, line, target, "an anchor into a file that is not a Markdown page")
        if anchor not in anchors(dest.read_text()):
            return Dead(page, line, target, f"no heading #{anchor} in {dest.name}")
    return None


def dead_links(page: Path) -> list[Dead]:
    found = [check_target(page, target, line) for line, target in links(page.read_text())]
    return [d for d in found if d is not None]


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


# -- the rules themselves ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("HTTP API and data channel", "http-api-and-data-channel"),
        ("GPU server, browser on a laptop", "gpu-server-browser-on-a-laptop"),
        ("Why `--size auto` is 256x256 on a CPU", "why---size-auto-is-256x256-on-a-cpu"),
        ("Viewer `/view/latest` and `/view/{id}`", "viewer-viewlatest-and-viewid"),
        ("What these numbers say, and what they cannot", "what-these-numbers-say-and-what-they-cannot"),
        ("The [engine](x.md) and **its** _params_", "the-engine-and-its-params"),
        ("snake_case names stay", "snake_case-names-stay"),
        ("Café über alles", "café-über-alles"),
    ],
)
def test_slugs_follow_githubs_rules(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_repeated_headings_get_numbered_anchors_and_code_blocks_hold_none() -> None:
    text = "# Ports\n\n## Ports\n\n```sh\n# not a heading\n```\n\n### Ports\n"
    assert anchors(text) == {"ports", "ports-1", "ports-2"}


def test_a_dead_file_a_missing_anchor_and_a_bad_in_page_anchor_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#a-section) [fine too](#page) ![image](other.md) [web](https://example.org/x#y)\n"
        "[gone](missing.md) [no such section](other.md#b-section)\n"
        "[here](#nowhere), and `[in code](missing-too.md)`\n\n"
        "```md\n[in a block](missing-three.md)\n```\n\n"
        "[ref]: other.md#nope\n"
    )
    dead = dead_links(page)
    assert [(d.line, d.target) for d in dead] == [
        (4, "missing.md"),
        (4, "other.md#b-section"),
        (5, "#nowhere"),
        (11, "other.md#nope"),
    ]


# -- the project's pages -----------------------------------------------------------------------------


def test_the_pages_exist_and_each_says_what_it_is_for() -> None:
    expected = {"README.md", "pages-and-obs.md", "deployment.md", "api.md", "configuration.md",
                "models-and-backends.md", "temporal.md", "controlnet.md", "scaling-out.md", "benchmarks.md",
                "gpu-check.md", "development.md"}  # fmt: skip
    assert expected <= {p.name for p in (ROOT / "docs").glob("*.md")}
    for page in (ROOT / "docs").glob("*.md"):
        lines = page.read_text().split("\n")
        assert lines[0].startswith("# "), f"{page.name} starts with its title"
        assert lines[2].startswith("This page is for") or lines[2].startswith("This page is the"), (
            f"{page.name}: its first sentence says what it is for"
        )


def test_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.split("\n")) < 300
    linked = {target.partition("#")[0] for _, target in links(text)}
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= linked, "the README links every docs page"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert [str(d) for d in dead_links(page)] == []


def _code_files() -> list[Path]:
    roots = [ROOT / name for name in ("livediff", "scripts", "tests", "web", "deploy", ".ci")]
    files = [p for r in roots for p in r.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [ROOT / name for name in ("Makefile", "Dockerfile", "docker-compose.yml", "pyproject.toml")]
    return [p for p in files if p.exists() and p.suffix not in (".png", ".sdp") and p != Path(__file__).resolve()]


def test_code_that_points_to_a_docs_page_names_one_that_exists() -> None:
    dead, seen = [], 0
    for path in _code_files():
        text = path.read_text(errors="replace")
        for m in CODE_REFERENCE.finditer(text):
            seen += 1
            line = text.count("\n", 0, m.start()) + 1
            found = check_target(ROOT / "docs" / "README.md", m.group(1) + (m.group(2) or ""), line)
            if found:
                dead.append(f"{path.relative_to(ROOT)}:{line}: {found.target} ({found.why})")
        for m in README_SECTION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            dead.append(f"{path.relative_to(ROOT)}:{line}: points into a README section; name its docs/ page")
    assert seen, "the code points readers to docs/ pages (the TLS message, the GPU check's scripts)"
    assert dead == []
