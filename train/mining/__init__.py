"""`curate mine`: embed a `curate select` subset with frozen encoders, then mine HELIP's hard pairs.

Output (a local directory or a URL such as s3://bucket/mined; every object written through
`curation.core.storage`, so it appears complete or not at all):

    mine.json                     the encoders' fingerprint (a run with other encoders is refused)
    embeddings/00000.parquet      per input shard: uid, image_emb, text_emb (float32, L2-normalised)
    embeddings/.tmp/              local outputs: files being written, renamed into place when complete
                                  (object stores: this machine's temp folder, then one PUT)
    ledger/00000.json             written after the embeddings: that shard is embedded (with its tar's
                                  size and mtime, or on an object store its size and ETag)
    hard_pairs.parquet            uid, hard_uids (list), hard_scores (list, descending) + parameters in metadata
    .lock                         held while `curate mine` writes (one writer per output)

Embedding is resumable like `curate run`: a shard's embeddings appear complete or
not at all, and the ledger entry follows them, so a run killed at any moment and
started again embeds exactly the shards that lack an entry (a tar that changed
is embedded again). The input tars (`data.shards`) and the CLIP checkpoint may be
URLs too; tars are streamed, never copied to disk. Mining reads the stored
embeddings into memory (every search, FAISS's index included, is built in memory:
nothing of it needs local disk), so a new k, threshold or search method costs no
re-embedding. `hard_pairs.parquet` is replaced atomically.

config: the YAML; store: the resumable embeddings; search: the hard-pair searches (HELIP) over
embeddings in memory; output: hard_pairs.parquet; run: `mine()`, tying them together (the command: curation/cli/train.py).
"""
