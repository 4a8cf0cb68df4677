"""`python -m curation.cli ...` is `curate ...`."""

from curation.cli import main

raise SystemExit(main())
