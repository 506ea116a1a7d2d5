"""Reaching the model inside megatron's wrappers, in a leaf module: the checkpointing, the
weight gather and the built-in engine need it without building a model."""


def unwrap_model(model):
    """The GPTModel inside megatron's DDP and Float16Module wrappers (each adds `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model
