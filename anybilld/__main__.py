"""``python -m anybilld``: the same as the ``anybilld`` command."""

from .cli import main

raise SystemExit(main())
