"""What a model costs: trainable/stored parameters (``params``), FLOPs (``flops``) and batch-1
latency and FPS (``bench``). Uses the builder and the deployed model (serve/) to build models; they never import it."""
