import sys

from covpool.cli import main

sys.exit(main())
