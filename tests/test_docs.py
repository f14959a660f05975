"""The README and docs/ pages: every relative link (and its #anchor) resolves, the README stays short,
and the pages speak of the project, not of how it was developed."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# words a reader of the project has no use for: development history, not the project
HISTORY = re.compile(r"\bissue\s*#?\d+|\bNOTES\b|this session|was lent|were lent|the review\b", re.I)


def _text_outside_code(page: Path) -> str:
    return INLINE_CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_text_outside_code(page))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: ...


def test_docs_pages_exist():
    names = {p.name for p in PAGES}
    for name in ("engine.md", "atlas.md", "app.md", "pacs.md", "security.md", "training.md",
                 "scaling.md", "figures.md"):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    links = _relative_links(page)
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.relative_to(ROOT)}")
        elif not target.is_relative_to(ROOT):
            broken.append(f"{link}: points outside the repository")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_link_checker_sees_links_and_anchors():
    """The checker itself: it finds the README's links, and a made-up anchor would not pass."""
    readme = ROOT / "README.md"
    links = _relative_links(readme)
    assert any(link.startswith("docs/") for link in links)
    assert "quick-start" in _anchors(readme)
    assert "no-such-heading" not in _anchors(readme)
    assert _anchors(ROOT / "docs" / "engine.md") >= {"how-it-is-fast-and-still-the-papers-method",
                                                     "outputs-ssl-medsam2-pseudo-label"}


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_speak_of_the_project_not_its_history(page):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
            if HISTORY.search(line)]
    assert not hits, f"{page.relative_to(ROOT)} mentions development history:\n" + "\n".join(hits)
