"""`python -m restora ...` (and `torchrun -m restora train ...`): the `restora` command line."""

from restora.cli import main

raise SystemExit(main())
