"""``python -m metanorm`` runs the command line."""

from metanorm.cli import main

raise SystemExit(main())
