"""The `omni` command line: every command, including those that drive training for align (main.py)."""
