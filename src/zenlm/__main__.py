"""``python -m zenlm`` is the ``zenlm`` command."""

import sys

from zenlm.cli import main

sys.exit(main())
