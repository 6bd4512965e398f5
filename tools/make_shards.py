#!/usr/bin/env python
from tryon_ds.tools.make_shards import main

if __name__ == "__main__":
    main()
