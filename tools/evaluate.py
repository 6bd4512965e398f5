#!/usr/bin/env python
from tryon_ds.tools.evaluate import main

if __name__ == "__main__":
    main()
