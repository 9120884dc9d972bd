"""``python -m formula_foundry.sync``: the same as the ``ff-sync`` command."""

from formula_foundry.sync.commands.cli import run

if __name__ == "__main__":
    run()
