"""The README and `docs/`: the README stays short and links every page of `docs/`, and every
relative link of either, `#anchor` included, leads somewhere that exists."""

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 300

# `[text](target)` or `[text](target "title")`, images too; the text may hold `code` and one
# level of brackets.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+).*?\1")
_HTML_ANCHOR = re.compile(r"""<a\s+(?:id|name)=["']([^"']+)["']""", re.I)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto: …


def prose(path: Path):
    """The lines of a Markdown file outside fenced code blocks, with their numbers."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (links as their text, no markup) in lower
    case, every character that is neither a letter, a digit, a space, `-` nor `_` removed, and
    each space made a `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> "set[str]":
    """Every anchor a page's headings make, repeated headings numbered as GitHub does (`-1` …),
    and every HTML anchor it sets (`<a id="…"></a>`, `<a name="…"></a>`)."""
    seen: "dict[str, int]" = {}
    found = set()
    for _, line in prose(path):
        found.update(_HTML_ANCHOR.findall(_INLINE_CODE.sub("", line)))
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path):
    """(line number, target) of every link of a page, outside code; a link's text may run over
    two lines."""
    numbered = [(number, _INLINE_CODE.sub("", line)) for number, line in prose(path)]
    text = "\n".join(line for _, line in numbered)
    starts = []  # the offset in `text` where each line begins
    offset = 0
    for _, line in numbered:
        starts.append(offset)
        offset += len(line) + 1
    for match in _LINK.finditer(text):
        index = max(i for i, start in enumerate(starts) if start <= match.start())
        yield numbered[index][0], match.group(1)


def relative_links(path: Path):
    """(line number, target file, anchor or None) of every link of a page to this repository."""
    for number, target in links(path):
        if _EXTERNAL.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        file = path if not file_part else (path.parent / unquote(file_part)).resolve()
        yield number, file, unquote(anchor) if anchor else None


def test_there_are_docs_pages():
    assert DOCS, "no docs/*.md"


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, \
        f"README.md has {len(lines)} lines, more than {MAX_README_LINES}: move some to docs/"


def test_the_readme_links_every_docs_page():
    linked = {file for _, file, _ in relative_links(README)}
    missing = [page.name for page in DOCS if page.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_every_docs_page_starts_with_a_title_and_what_it_is_for():
    for page in DOCS:
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines and re.match(r"# \S", lines[0]), f"{page.name}: no title on its first line"
        body = [line for line in lines[1:] if line.strip()]
        assert body and not body[0].startswith("#"), \
            f"{page.name}: no line under the title saying what the page is for"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for number, file, anchor in relative_links(page):
        where = f"{page.relative_to(ROOT)}:{number}"
        if not file.exists():
            broken.append(f"{where}: {os.path.relpath(file, ROOT)} does not exist")
        elif anchor is not None:
            if file.suffix != ".md":
                broken.append(f"{where}: #{anchor} into {file.name}, which is not Markdown")
            elif anchor not in anchors(file):
                broken.append(f"{where}: no heading of {file.name} makes #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("heading, anchor", [
    ("Fleet view: `GET /_backends`", "fleet-view-get-_backends"),
    ("The backend list (`ip.txt`)", "the-backend-list-iptxt"),
    ("What happens when…", "what-happens-when"),
    ("The fleet simulation: `bench/fleet_sim.py`", "the-fleet-simulation-benchfleet_simpy"),
    ("Request id: `X-Request-Id`", "request-id-x-request-id"),
    ("A  B", "a--b"),
])
def test_anchors_follow_githubs_rules(heading, anchor):
    assert slug(heading) == anchor
