import sys

from dust.cli.main import main

sys.exit(main())
