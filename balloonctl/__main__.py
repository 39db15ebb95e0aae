"""`python -m balloonctl ...`: the same as the `balloonctl` command."""

from balloonctl.cli import main

raise SystemExit(main())
