"""``python -m attnprobe`` is the ``attnprobe`` command."""

import sys

from .study.cli import main

sys.exit(main())
