#!/usr/bin/env python
from tryon_ds.tools.bench_train import main

if __name__ == "__main__":
    main()
