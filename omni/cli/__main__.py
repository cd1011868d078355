"""`python -m omni.cli ...` (what torchrun and the deepspeed launcher run)."""
from omni.cli.main import main

main()
