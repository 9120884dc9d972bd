"""docs/cli.md is exactly what tools/gen_cli_docs.py generates from ``ff-sync --help``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REGENERATE = ".venv/bin/python tools/gen_cli_docs.py"


def _generator() -> ModuleType:
    path = REPO_ROOT / "tools" / "gen_cli_docs.py"
    spec = importlib.util.spec_from_file_location("gen_cli_docs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _generator()


def test_checked_in_cli_reference_is_current(gen: ModuleType) -> None:
    checked_in = (REPO_ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert checked_in == gen.generate(), (
        f"docs/cli.md is stale: regenerate it with `{REGENERATE}` and commit the result "
        f"(`{REGENERATE} --check` shows the diff)"
    )


def test_every_command_of_the_group_is_documented(gen: ModuleType) -> None:
    from formula_foundry.sync.commands.cli import main

    assert isinstance(main, click.Group)
    text = gen.generate()
    for name in main.list_commands(click.Context(main)):
        assert f"\n## ff-sync {name}\n" in text, f"ff-sync {name} is missing from docs/cli.md"


def test_every_exit_code_constant_is_in_the_table(gen: ModuleType) -> None:
    import formula_foundry.errors as errors
    import formula_foundry.sync.commands.cli as cli

    text = gen.exit_code_table()
    for module in (errors, cli):
        for name, value in vars(module).items():
            if name.startswith("EXIT_") and isinstance(value, int):
                assert f"| `{value}` |" in text and f".{name}`" in text


def test_the_walk_finds_commands_added_later_and_nested_groups(gen: ModuleType) -> None:
    @click.group()
    def root() -> None:
        """Root."""

    @root.command("status")
    def status() -> None:
        """Show status."""

    @root.group("admin")
    def admin() -> None:
        """Admin commands."""

    @admin.command("verify")
    @click.option("--older-than", required=True, type=float)
    def verify(older_than: float) -> None:
        """Verify things."""

    @root.command("secret", hidden=True)
    def secret() -> None:
        """Hidden."""

    paths = [ctx.command_path for ctx in gen.walk(gen._context(root, "ff-sync"))]
    assert paths == ["ff-sync", "ff-sync admin", "ff-sync admin verify", "ff-sync status"]


def test_check_mode_exits_1_with_a_diff_on_a_stale_page(
    gen: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "cli.md"
    page.write_text("stale\n", encoding="utf-8")
    assert gen.main(["--check", "--path", str(page)]) == 1
    out, err = capsys.readouterr()
    assert "-stale" in out and "+# `ff-sync` command reference" in out
    assert REGENERATE in err
    assert gen.main(["--path", str(page)]) == 0
    assert gen.main(["--check", "--path", str(page)]) == 0
