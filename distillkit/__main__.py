"""``python -m distillkit``: the same as the ``distillkit`` command."""

from distillkit.cli import main

main()
