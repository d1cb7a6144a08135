"""`python -m detox_tui` runs the CLI (and the app when no command is given)."""

from detox_tui.cli import main

raise SystemExit(main())
