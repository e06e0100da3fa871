"""The README and the manual stay true: every link resolves (files and headings), the command-line page is what the
parser prints, every recipe key is documented, the README stays a front page, and the cheap command blocks (those
on tiny-llama) run as written."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    broken = []
    for target in LINK.findall(re.sub(r"```.*?```", "", page.read_text(), flags=re.S)):
        if re.match(r"https?://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert broken == []


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_command_line_page_is_current():
    from nexus_export.cli_reference import main

    assert main(["--check"]) == 0, "docs/cli.md is stale: run python -m nexus_export.cli_reference"


def test_every_recipe_key_is_documented():
    from nexus_export.run.recipe import (
        CalibrationSettings,
        EvaluationSettings,
        ExecutionSettings,
        LoweringSettings,
        QuantizeSettings,
    )

    text = (ROOT / "docs" / "recipes.md").read_text()
    sections = {"calibration": CalibrationSettings, "evaluation": EvaluationSettings, "lowering": LoweringSettings,
                "quantize": QuantizeSettings, "execution": ExecutionSettings}
    missing = [f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)
               if f"`{name}.{f.name}`" not in text]
    missing += [key for key in ("model", "passes", "bos", "convert_pickled") if f"`{key}`" not in text]
    assert missing == []


def cheap_commands() -> list[tuple[str, list[str]]]:
    """The command blocks on tiny-llama: each block's nexus-export lines on it, continuation lines joined."""
    blocks = []
    for page in PAGES:
        for block in code_blocks(page, "bash"):
            if "tiny-llama" not in block:
                continue
            joined = re.sub(r"\\\n\s*", " ", block)
            lines = [line.split("  #")[0].strip() for line in joined.splitlines()]
            commands = [line for line in lines if line.startswith("nexus-export ") and "tiny-llama" in line]
            if commands:
                blocks.append((page.name, commands))
    return blocks


@pytest.mark.slow
@pytest.mark.parametrize("page, commands", cheap_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_the_cheap_command_blocks_run_as_written(page, commands, tmp_path):
    assert commands
    for command in commands:
        args = shlex.split(command)[1:]
        result = subprocess.run([sys.executable, "-m", "nexus_export", "-q", *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{page}: {command}\n{result.stderr[-2000:]}"


@pytest.mark.slow
def test_the_readmes_three_commands_run_on_a_saved_folder(tmp_path):
    """The README's "your own model" block, on a tiny LLaMA saved with save_pretrained: prune it to 2:4, generate
    from the run folder, package a bundle (the prune line gains small-window flags so it runs in seconds)."""
    from conftest import make_tiny

    from nexus_export.models.zoo import byte_level_tokenizer

    text = (ROOT / "README.md").read_text().split("## Your own model in three commands", 1)[1]
    lines = [line.split("  #")[0].strip() for line in text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()]
    assert [line.split()[1] for line in lines] == ["prune", "generate", "package"]
    folder = tmp_path / "path" / "to" / "hf-folder"
    make_tiny("llama").save_pretrained(folder)
    byte_level_tokenizer(512).save_pretrained(folder)
    fast = ["--calib-samples", "4", "--seq-len", "64", "--eval-windows", "2", "--no-latency", "--no-decode-speed"]
    for line in lines:
        args = shlex.split(line)[1:] + (fast if line.split()[1] == "prune" else [])
        result = subprocess.run([sys.executable, "-m", "nexus_export", *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
    assert (tmp_path / "out" / "my24" / "model.kv.onnx").is_file()
    assert json.loads((tmp_path / "out" / "my24-bundle" / "manifest.json").read_text())["generation_check"]
    assert (tmp_path / "out" / "my24-bundle.tar.gz").is_file()
