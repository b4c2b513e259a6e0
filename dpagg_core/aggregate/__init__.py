"""One release end to end (release), aggregation in a public subspace (subspace) and free
post-processing of the released vector (postprocess)."""
