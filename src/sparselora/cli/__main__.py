import sys

from sparselora.cli.app import main

sys.exit(main())
