"""``python -m slimtune`` (also ``torchrun -m slimtune train ...``)."""

from .app.cli import main

main()
