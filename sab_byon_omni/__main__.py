import sys

from sab_byon_omni.cli import main

sys.exit(main())
