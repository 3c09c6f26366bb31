"""``python -m clip_supervisor``: the ``clip-supervisor`` command."""

import sys

from clip_supervisor import main

sys.exit(main())
