"""``python -m attnprobe`` is the ``attnprobe`` command."""

import sys

from .cli import main

sys.exit(main())
