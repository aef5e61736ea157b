import os
import sys

from .warm_worker import ENV, forward

# a job started beside a warm worker (`python -m kvsharer warm-worker -- snakemake ...`) runs in it
status = forward(os.environ[ENV], sys.argv[1:]) if os.environ.get(ENV) else None
if status is None:
    from .cli import main

    status = main()
sys.exit(status)
