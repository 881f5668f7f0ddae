import sys

from sab_byon_omni.cli import entry

sys.exit(entry())
