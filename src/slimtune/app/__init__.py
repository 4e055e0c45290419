"""The application of the library: run configs, the data registry, the training loop, reports,
run directories and the ``slimtune`` command line.

It imports the library (:mod:`slimtune`), never the other way round, and may use what the library
must not need (typer, tqdm, matplotlib, accelerate, PyYAML).
"""
