#!/usr/bin/env python
from tryon_ds.tools.infer import main

if __name__ == "__main__":
    main()
