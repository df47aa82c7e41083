"""Every relative link in README.md and docs/*.md resolves: the file or folder exists in the
repository and, for a link with a #fragment into a Markdown file, that file has a heading with
that anchor (GitHub's rule: lower case, punctuation dropped, spaces to hyphens, "-1", "-2" ...
for repeats). Links inside code are not links; absolute URLs are not checked (no network)."""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
# [text](target) and ![alt](target), with an optional "title"; text may hold one level of [...].
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").replace("*", "")
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.strip().lower().replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8"))) if t and not SCHEME.match(t)]


def test_the_pages_exist():
    assert (ROOT / "README.md").is_file() and len(PAGES) > 1


def test_slug_follows_github():
    assert slug("2. The operators: `torch.ops.protoseg`") == "2-the-operators-torchopsprotoseg"
    assert slug("The released behaviours, and protoseg's defaults") == (
        "the-released-behaviours-and-protosegs-defaults"
    )
    assert slug("On a GPU: `make gpu-check`") == "on-a-gpu-make-gpu-check"


def test_the_link_pattern_skips_code():
    text = "see [a](x.md) and `[b](y.md)`\n```\n[c](z.md)\n```\n![d](img.png \"t\") [e](https://x.org)"
    assert LINK.findall(prose(text)) == ["x.md", "img.png", "https://x.org"]


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The page's relative links that do not resolve inside root, each with the reason."""
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(root):
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no {dest.relative_to(root)}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(root)}")
    return broken


def test_the_checker_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B\n## Two words\n## Two words\n")
    page = tmp_path / "docs" / "a.md"
    page.write_text(
        "# A page\n[ok](b.md#two-words-1) [ok](#a-page) [ok](../docs/)\n"
        "[bad](c.md) [bad](#nope) [bad](b.md#two-words-2) [bad](../../x.md)\n"
    )
    assert broken_links(page.resolve(), tmp_path.resolve()) == [
        "c.md: no docs/c.md",
        "#nope: no heading #nope in docs/a.md",
        "b.md#two-words-2: no heading #two-words-2 in docs/b.md",
        "../../x.md: outside the repository",
    ]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
