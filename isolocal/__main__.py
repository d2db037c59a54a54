"""`python -m isolocal ...` is the `isolocal` command."""
import sys

from isolocal.cli import main

sys.exit(main())
