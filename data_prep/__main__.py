"""`python -m data_prep ...`: the same as the `data-prep` command."""
import sys

from data_prep.cli import main

sys.exit(main())
