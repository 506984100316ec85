"""The documentation holds together: every relative link in the repository's markdown resolves (file and
#anchor), no document points outside the repository, every page of docs/ is linked from the README, the
README stays short, its test command is the one CI runs, and the docstring examples of the public API run."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 15 * 1024
DOCSTRING_MODULES = ("prcl.functional", "prcl.nn", "prcl.distributed")

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
URL = re.compile(r"\b(?:https?|ftp)://|(?<![/\w.])www\.", re.I)


def markdown_files():
    # the committed markdown, plus any new page not yet added to git; not the pages of installed packages
    # (a virtual environment inside the checkout, whatever its name)
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:  # a tree without .git
        paths = [p for p in ROOT.rglob("*.md") if ".git" not in p.parts]
    else:
        paths = [ROOT / line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]
    return sorted(p for p in paths if "site-packages" not in p.relative_to(ROOT).parts)


def prose(path):
    """The text outside fenced code blocks and code spans: where a link is a link."""
    return CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))


def slug(heading):
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path, root=ROOT):
    problems = []
    for target in LINK.findall(prose(path)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
            problems.append(f"{target}: points outside the repository")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if root not in dest.parents and dest != root:
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(path):
    problems = broken_links(path)
    problems += [f"line {path.read_text(encoding='utf-8')[:m.start()].count(chr(10)) + 1}: a web address"
                 for m in URL.finditer(path.read_text(encoding="utf-8"))]
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_link_check_catches_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Top `x`\n\n## Two: words (here)\n\n[ok](b.md#top-x) [ok](#two-words-here)\n"
                                   "[bad](c.md) [bad](b.md#nowhere) [bad](https://example.org)\n"
                                   "```\n[in code](nowhere.md)\n```\n")
    (tmp_path / "b.md").write_text("# Top `x`\n")
    assert broken_links(tmp_path / "a.md", tmp_path) == ["c.md: no such file",
                                               "b.md#nowhere: no heading with anchor #nowhere in b.md",
                                               "https://example.org: points outside the repository"]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README))}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_is_short():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail to docs/"


def test_readme_test_command_is_the_one_ci_runs():
    blocks = re.findall(r"^```bash\n(.*?)\n```", README.read_text(encoding="utf-8"), re.M | re.S)
    commands = [b for b in blocks if "pytest" in b]
    assert len(commands) == 1, f"README.md: expected one bash block with the test command, got {commands}"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    body = re.search(r"^readme\(\) \{\n(.*?)\n\}", ci, re.M | re.S)
    assert body, ".ci/run: no readme() function"
    assert body.group(1).strip() == commands[0].strip(), \
        "the README's test command and .ci/run's readme() differ: keep them the same"


@pytest.mark.parametrize("module", DOCSTRING_MODULES)
def test_docstring_examples_run(module):
    # a fresh process: the distributed example starts (and ends) a one-rank process group
    code = (f"import doctest, sys, {module} as m; r = doctest.testmod(m, optionflags=doctest.ELLIPSIS); "
            f"sys.exit(1 if r.failed or not r.attempted else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{module}: docstring examples failed\n{run.stdout}{run.stderr}"
