"""Files in and out: private images (canonical decode, dataset id), the EmbeddingSet, the private
per-image file, the released embedding file, names and the atomic writer."""
