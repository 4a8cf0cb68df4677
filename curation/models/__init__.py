"""Models from local files, used by the stages and by `train` alike (never downloads).

clip: open_clip models and checkpoints; teachers: frozen image classifiers; encoders: what
`curate mine` embeds with; ocr: the batched text-spotting engine; vocabulary: class-name files.
Importing this package loads no model library.
"""
