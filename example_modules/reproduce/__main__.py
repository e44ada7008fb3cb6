"""``python -m example_modules.reproduce [--small] [--out DIR]``: see
:func:`example_modules.reproduce.cli.main`."""

from example_modules.reproduce.cli import main

if __name__ == "__main__":
    main()
