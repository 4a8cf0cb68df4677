"""`python -m train CONFIG.yaml [--resume]` and `torchrun --nproc_per_node N -m train CONFIG.yaml`."""

from train.cli import main

raise SystemExit(main())
