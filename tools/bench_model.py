#!/usr/bin/env python
from tryon_ds.tools.bench_model import main

if __name__ == "__main__":
    main()
