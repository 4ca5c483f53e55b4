import sys

from pd.router.cli import main

sys.exit(main())
