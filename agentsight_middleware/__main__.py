"""``python -m agentsight_middleware``: the ``agentsight-middleware`` command."""

from .cli import main

raise SystemExit(main())
