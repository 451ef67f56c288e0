import sys

from natpool.cli import main

sys.exit(main())
