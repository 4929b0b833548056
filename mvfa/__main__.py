"""python -m mvfa COMMAND [flags]: the `mvfa` command (mvfa.commands) without installing the package."""
import sys

from mvfa.commands import main

sys.exit(main())
