"""``dpagg demo``: the bundled mini model, the demo run and image previews."""
