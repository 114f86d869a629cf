import sys

from ddpo.cli import main

sys.exit(main())
