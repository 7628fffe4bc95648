import sys

from cke_dist.cli import main

sys.exit(main())
