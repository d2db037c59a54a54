"""`python -m isolocal.cli`: the same as `isolocal` / `python -m isolocal`."""
import sys

from isolocal.cli import main

sys.exit(main())
