"""The `levante` command's entry point (the console script, and `python -m levante`).

Before anything else is imported, the cycle collector's first threshold goes from 700 to
10000 allocations for this process: starting a command allocates millions of objects that
live to its end (PyTorch's modules, a GGUF's vocabulary), and each full collection walked all
of them again. Measured on 2 cores (import torch, the CLI, load SmolLM2): ~0.2-0.4 s of a ~2.4 s
cold `levante generate`, about what disabling the collector saves. Collections still run, so a
long `levante serve` frees its cycles as before. Not set in `levante.cli`, which the tests and
library users import.
"""

import gc

gc.set_threshold(10_000, *gc.get_threshold()[1:])

from levante.cli import main  # after the threshold, on purpose

if __name__ == "__main__":
    main()
