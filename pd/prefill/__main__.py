import sys

from pd.prefill.cli import main

sys.exit(main())
