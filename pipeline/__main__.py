"""``python -m pipeline``: see :mod:`pipeline.driver.cli`."""

from pipeline.driver.cli import main

raise SystemExit(main())
