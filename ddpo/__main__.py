import sys

from ddpo.commands import main

sys.exit(main())
