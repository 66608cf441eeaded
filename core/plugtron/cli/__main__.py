import sys

from plugtron.cli import main

sys.exit(main())
