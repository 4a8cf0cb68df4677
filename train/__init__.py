"""curate's trainer: contrastive CLIP training (open_clip models) on curated webdataset shards.

Public surface: `train.loop.train(cfg)`, `train.validation.load_checked_train_config(path)`,
the losses in `train.losses`, evaluation in `train.evaluate`. Its commands (`curate train`,
`eval`, `mine`) live in the CLI package, curation/cli/train.py. Importing this package does not
import torch.
"""
