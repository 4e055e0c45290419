"""``python -m slimtune`` (also ``torchrun -m slimtune train ...``)."""

from .cli import main

main()
