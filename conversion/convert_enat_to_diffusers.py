# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Convert the original ENAT and AutoNAT checkpoints to diffusers folders.

Usage: `python conversion/convert_enat_to_diffusers.py -h`.

The key maps and loaders live in `enat_diffusers.conversion`; this file is the command line only.
"""

from enat_diffusers.conversion.cli import main


if __name__ == "__main__":
    main()
