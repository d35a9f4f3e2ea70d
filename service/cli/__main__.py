"""`python -m personalize_service.cli ...`, the same as the `personalize` console script."""

import sys

from personalize_service.cli.commands import main

sys.exit(main())
