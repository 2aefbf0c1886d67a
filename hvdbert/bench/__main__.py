import sys

from hvdbert.bench.cli import main

sys.exit(main())
