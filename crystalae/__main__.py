import sys

from crystalae.cli import main

sys.exit(main())
