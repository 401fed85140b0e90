"""``python -m streamssl``: the same as the ``streamssl`` console script (torchrun -m streamssl run ...)."""

from streamssl.cli import main

main()
