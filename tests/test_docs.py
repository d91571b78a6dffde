"""The documentation: README.md and docs/*.md link to files and headings that exist, the README stays short,
and its two commands are the ones the demo and CI run."""

import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
MAX_README_LINES = 220

# The README's "two commands" block, byte for byte: CI and the demo's users copy them from there.
DEMO_COMMAND = (
    "pip install -r requirements.txt && python unimatch.py --config configs/demo.yaml --save-path runs/demo "
    "&& python eval.py --config configs/demo.yaml --checkpoint runs/demo/best.pth --save-vis runs/demo/vis"
)
TEST_COMMAND = "python -m pytest"


def markdown_files() -> list[str]:
    return [README] + sorted(os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked out."""
    lines, fence = [], None
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.lstrip()
        marker = stripped[:3]
        if fence is None and marker in ("```", "~~~"):
            fence = marker
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            continue
        lines.append((number, re.sub(r"`[^`]*`", "``", line)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lowercased, punctuation other than '-' and '_' dropped,
    spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading's anchor in a markdown file; a repeated one gets -1, -2, ... as on GitHub."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen: dict[str, int] = {}
    result = set()
    fence = None
    for line in text.split("\n"):
        stripped = line.lstrip()
        if fence is None and stripped[:3] in ("```", "~~~"):
            fence = stripped[:3]
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            continue
        match = re.match(r"#{1,6} +(.*?)[ #]*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")


def links(path: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline, image and reference-style link outside code."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = []
    for number, line in prose_lines(text):
        found += [(number, target) for target in LINK.findall(line)]
        reference = REFERENCE.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return found


def broken_links(path: str, root: str = ROOT) -> list[str]:
    """'file:line: target (why)' for every relative link whose file or #anchor does not exist."""
    problems = []
    here = os.path.dirname(path)
    for number, target in links(path):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        where = f"{os.path.relpath(path, root)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(here, file_part)) if file_part else path
        if os.path.relpath(linked, root).startswith(".."):
            problems.append(f"{where} (outside the repository)")
        elif not os.path.exists(linked):
            problems.append(f"{where} (no such file)")
        elif anchor:
            if not linked.endswith(".md"):
                problems.append(f"{where} (an anchor into a file that is not markdown)")
            elif anchor not in anchors(linked):
                problems.append(f"{where} (no heading with that anchor)")
    return problems


def readme_lines() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return f.read().split("\n")


def two_commands() -> list[str]:
    """The commands of the README's "The two commands" block, read from the README."""
    lines = readme_lines()
    start = lines.index("## The two commands")
    opening = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].startswith("```"))
    return [line for line in lines[opening + 1 : closing] if line.strip() and not line.startswith("#")]


# ---------------------------------------------------------------------------------------------------
# The link checker itself


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("Results on CamVid (12 labels)", "results-on-camvid-12-labels"),
        (
            "CISC-R: rectifying pseudo-labels with a queried labeled image",
            "cisc-r-rectifying-pseudo-labels-with-a-queried-labeled-image",
        ),
        (
            "The online variant (`ciscr.mode: online`, not in the paper)",
            "the-online-variant-ciscrmode-online-not-in-the-paper",
        ),
        ("Each method's step on the demo config", "each-methods-step-on-the-demo-config"),
        ("Writing a method: the Method and Networks API", "writing-a-method-the-method-and-networks-api"),
        ("`max_iters` and [links](x.md)", "max_iters-and-links"),
    ],
)
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Same\n\n## Same\n\n```\n## Not a heading\n```\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine](other.md#same-1) [fine](#page) [web](https://example.com/#x)\n"
        "[no file](missing.md) [no anchor](other.md#same-2) [code heading](other.md#not-a-heading)\n"
        "[python](code.py#L1) [up](../elsewhere.md) ![picture](img.png)\n"
        "`[in code](missing.md)`\n\n```\n[in a block](missing.md)\n```\n\n[ref]: gone.md\n"
    )
    problems = broken_links(str(page), root=str(tmp_path))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "missing.md (no such file)",
        "other.md#same-2 (no heading with that anchor)",
        "other.md#not-a-heading (no heading with that anchor)",
        "code.py#L1 (an anchor into a file that is not markdown)",
        "../elsewhere.md (outside the repository)",
        "img.png (no such file)",
        "gone.md (no such file)",
    ]
    assert problems[0].startswith("page.md:4: ")


# ---------------------------------------------------------------------------------------------------
# The documentation


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_links_and_anchors_resolve(path):
    assert links(path) or path == README, "a page of the manual that links nowhere"
    assert broken_links(path) == []


def test_readme_is_short():
    lines = readme_lines()
    count = len(lines) - (lines[-1] == "")
    assert count <= MAX_README_LINES, f"README.md has {count} lines; move detail into docs/"


def test_readme_links_every_page_of_the_manual():
    linked = {os.path.normpath(os.path.join(ROOT, target.partition("#")[0])) for _, target in links(README)}
    pages = [p for p in markdown_files() if p != README]
    assert pages
    assert [os.path.relpath(p, ROOT) for p in pages if p not in linked] == []


def test_readme_two_commands():
    commands = two_commands()
    assert commands == [DEMO_COMMAND, TEST_COMMAND]
    # Everything the demo names exists, and it evaluates the checkpoint its training writes.
    words = shlex.split(DEMO_COMMAND)
    for name in ("requirements.txt", "unimatch.py", "eval.py", "configs/demo.yaml"):
        assert name in words and os.path.isfile(os.path.join(ROOT, name)), name
    save_path = words[words.index("--save-path") + 1]
    assert words[words.index("--checkpoint") + 1] == f"{save_path}/best.pth"


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    # CI may call the interpreter python3; the command is otherwise the README's, word for word.
    as_readme = [re.sub(r"^python3 ", "python ", line) for line in ci]
    assert TEST_COMMAND in as_readme
    assert two_commands()[-1] == TEST_COMMAND
    install = [line for line in ci if " pip install " in f" {line} "]
    assert install and all("-r requirements.txt" in line for line in install)
