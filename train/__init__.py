"""curate's trainer: contrastive CLIP training (open_clip models) on curated webdataset shards.

Public surface: `train.loop.train(cfg)`, `train.config.load_train_config(path)`,
the losses in `train.losses`, evaluation in `train.evaluate`, and the CLI hook
`train.cli.register(subparsers)`. Importing this package does not import torch.
"""
