"""Text to tokens and the Zarr stores: `corpus` (reading documents), `tokenizer`, `stores` (the one reader and
writer of each Zarr format), `batches` (the seeded batch order and the read-ahead reader)."""
