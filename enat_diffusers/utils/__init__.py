# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""What the command-line tools (`cli`) and the training scripts of `examples/` (`training`) share."""
