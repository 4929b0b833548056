"""MVFA test zero (the release's script name); flags: python test_zero.py --help."""
import sys

from mvfa.cli import main_test_zero

if __name__ == "__main__":
    sys.exit(main_test_zero())
