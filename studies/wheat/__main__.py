"""``python -m studies.wheat pretrain|adapt ...``."""

from .study import main

raise SystemExit(main())
