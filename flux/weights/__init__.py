"""Floor 1, weights: safetensors I/O, tokenizer files, layout conversion and config inference, quantized
storage (one `QuantizedLinear` concept: fp8 today), LoRA, and `load_*`, which dispatch over the file formats.

May import `flux.modules`; never the pipelines, training or the CLI.
"""
