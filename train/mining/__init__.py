"""`curate mine`: embed a `curate select` subset with frozen encoders, then mine HELIP's hard pairs.

Output directory:

    mine.json                     the encoders' fingerprint (a run with other encoders is refused)
    embeddings/00000.parquet      per input shard: uid, image_emb, text_emb (float32, L2-normalised)
    embeddings/.tmp/              files being written; renamed into place when complete
    ledger/00000.json             written after the rename: that shard is embedded (with its tar's size+mtime)
    hard_pairs.parquet            uid, hard_uids (list), hard_scores (list, descending) + parameters in metadata

Embedding is resumable like `curate run`: a shard's file appears complete or not
at all, and the ledger entry follows it, so a run killed at any moment and
started again embeds exactly the shards that lack an entry (a tar whose size or
mtime changed is embedded again). Mining reads the stored embeddings, so a new
k, threshold or search method costs no re-embedding. `hard_pairs.parquet` is
replaced atomically.

config: the YAML; store: the resumable embeddings; search: the hard-pair searches (HELIP) over
embeddings in memory; output: hard_pairs.parquet; run: `mine()`, tying them together (the command: curation/cli/train.py).
"""
