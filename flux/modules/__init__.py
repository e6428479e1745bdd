"""Floor 0, the networks: the FLUX transformer, the autoencoder, T5 and CLIP, and their config presets.

Pure `nn.Module` maths: no file reads, no device choices, no imports from the floors above.
"""
