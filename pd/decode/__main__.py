import sys

from pd.decode.cli import main

sys.exit(main())
