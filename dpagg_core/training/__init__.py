"""Per-image textual inversion (ti and its backends, models), the DP-SGD baseline (dpsgd,
dpsgd_run), the training driver (train_run), CLIP image embeddings and multi-GPU sharding."""
