#!/usr/bin/env python
from tryon_ds.tools.model_info import main

if __name__ == "__main__":
    main()
