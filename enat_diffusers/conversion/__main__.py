# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""`python -m enat_diffusers.conversion ...`: the conversion CLI (`-h` for its arguments)."""

from .cli import main


if __name__ == "__main__":
    main(prog="python -m enat_diffusers.conversion")
