"""`python -m batch_cli` = `moondream-batch`."""
import sys

from batch_cli.cli import main

sys.exit(main())
