"""Building blocks written out by hand: attention, positional encodings, norms, MLPs."""
