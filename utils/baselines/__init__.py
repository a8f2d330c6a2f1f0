"""The papers' baseline defences that are more than an augmentation: Orthogonal Projection
(ECLIPSE's comparison) and the dataset sanitisers Spectral Signatures and Activation
Clustering (DataElixir's)."""
