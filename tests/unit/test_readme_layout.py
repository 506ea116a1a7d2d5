"""The README's layout table matches the tree: every path it names exists, every file it lists
in a folder's row is there, and every package and top-level module of megatron_rl, every tool
and every doc has a row or a mention."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def layout_rows():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            # a row may name several paths: `a.py`, `b.py`
            rows += [(path, cells[1]) for path in re.findall(r"`([^`]+)`", cells[0])]
    return rows


def test_every_named_path_exists():
    rows = layout_rows()
    assert len(rows) > 10
    for path, what in rows:
        assert os.path.exists(os.path.join(ROOT, path)), f"README layout: {path} does not exist"
        if path.endswith("/"):
            for name in re.findall(r"`([\w./-]+\.(?:py|sh|md|yaml))`", what):
                assert os.path.exists(os.path.join(ROOT, path, name)), (
                    f"README layout: {path}{name} does not exist")


def test_every_package_module_tool_and_doc_is_listed():
    rows = layout_rows()
    listed = {path for path, _ in rows}
    mentioned = " ".join(what for _, what in rows)
    package = os.path.join(ROOT, "megatron_rl")
    for name in sorted(os.listdir(package)):
        full = os.path.join(package, name)
        if name.startswith(("_", ".")) or name == "__pycache__":
            continue
        if os.path.isdir(full):
            assert f"megatron_rl/{name}/" in listed, (
                f"README layout: no row for megatron_rl/{name}/")
        elif name.endswith(".py"):
            assert f"megatron_rl/{name}" in listed or f"`{name}`" in mentioned, (
                f"README layout: megatron_rl/{name} is not listed")
    for folder, suffixes in (("tools", (".py", ".sh")), ("docs", (".md",))):
        what = dict(rows)[f"{folder}/"]
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(suffixes):
                assert f"`{name}`" in what, f"README layout: {folder}/{name} is not listed"
