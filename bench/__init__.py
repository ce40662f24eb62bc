"""lapse's benchmark: `python bench/run.py` (wrk, lapse and its peers) and `python bench/run.py
micro` (the request path in process). See run.py for the modules and bench/README.md."""
