"""MVFA test few (the release's script name); flags: python test_few.py --help."""
import sys

from mvfa.cli import main_test_few

if __name__ == "__main__":
    sys.exit(main_test_few())
