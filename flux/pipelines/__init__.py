"""Floor 2, sampling: noise, packing, the schedule, the one denoising loop, image conditioning, and `Pipeline`.

May import `flux.modules`, `flux.weights` and `flux.runtime`.
"""
