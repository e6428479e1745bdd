"""Floor 1, runtime transforms of a built transformer: block offload and `torch.compile`.

Like LoRA and quantized storage they act on the model from outside. May import `flux.modules` only.
"""
