"""`make bench`: measurements of sigmax-fl on this machine (see bench/run.py)."""
