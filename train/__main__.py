"""`python -m train CONFIG.yaml [--resume]` and `torchrun --nproc_per_node N -m train CONFIG.yaml`."""

from curation.cli import main_train

raise SystemExit(main_train())
