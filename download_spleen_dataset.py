"""Download MSD Task09_Spleen (or write synthetic data); see `--help`. Same as the `spleen-download` command."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Work from a plain checkout too (package not installed).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from spleen_tools.cli.download import main

    raise SystemExit(main())
