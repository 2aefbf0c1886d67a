import sys

from hvdbert.errors import quiet_interrupts

quiet_interrupts("hvdbert.bench")  # before the benchmark's imports (torch): a Ctrl-C there is one line

from hvdbert.bench.cli import main  # noqa: E402

sys.exit(main())
