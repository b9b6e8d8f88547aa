"""What a model costs: trainable/stored parameters (``params``), FLOPs (``flops``) and batch-1
latency and FPS (``bench``). Uses the engine to build models; the engine never imports it."""
