import sys

from recognite.cli import main

sys.exit(main())
