"""data_prep: native dataset lists -> img2dataset WebDataset shards + manifest.json (offline, model-free).

Entry point: `data_prep.prep.run_prep` (called by `albef prep`). Knows nothing of the model or the
training pipeline; the pipeline reads what this package writes (see the shard/manifest contract).
What it guarantees about untrusted lists (URL schemes, `--image_root` containment, the pixel limit,
undecodable rows) is listed in `data_prep.prep`.
"""
