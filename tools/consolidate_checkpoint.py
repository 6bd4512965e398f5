#!/usr/bin/env python
from tryon_ds.tools.consolidate_checkpoint import main

if __name__ == "__main__":
    main()
