"""``python -m formula_foundry.sync``: the same as the ``ff-sync`` command."""

from formula_foundry.sync.cli import main

if __name__ == "__main__":
    main(prog_name="ff-sync")
