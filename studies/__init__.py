"""Studies: applications of the slimtune library and its application layer to one research
question each, with their own data, configs and command line (``python -m studies.NAME``).

They import :mod:`slimtune` and :mod:`slimtune.app`; nothing in ``src/`` imports them. A study's
run directory names the study in its ``config.yaml`` (``study: NAME``), so ``slimtune eval``,
``export`` and ``info`` can rebuild it through the study's ``rebuild(run_dir)``.
"""
