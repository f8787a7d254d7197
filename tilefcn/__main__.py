"""``python -m tilefcn`` is the ``tilefcn`` command."""

from tilefcn.cli import main

if __name__ == "__main__":
    main(prog_name="tilefcn")
