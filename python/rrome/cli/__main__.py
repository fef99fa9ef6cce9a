"""``python -m rrome.cli``: the ``rrome`` command."""

from rrome.cli import main

main()
