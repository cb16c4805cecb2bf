"""``python -m kvcompress``: command-line entry points."""

from .cli import main

raise SystemExit(main())
