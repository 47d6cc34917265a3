import sys

from radsynth.cli import main

sys.exit(main())
