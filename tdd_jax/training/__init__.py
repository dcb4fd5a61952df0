"""Distillation training: device mesh and shardings, the frozen pipeline, the train state and the compiled step."""
