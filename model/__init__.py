"""ViS4mer and its S4 layer in pure PyTorch (no Ray, no MLflow here)."""
from model.attention import SelfAttentionBaseline
from model.optim import param_groups
from model.s4 import S4, S4Config, kernel_diag, kernel_nplr
from model.vis4mer import VARIANTS, ViS4mer, ViS4merConfig, create_model, list_variants, variant_config

__all__ = [
    "S4", "S4Config", "kernel_diag", "kernel_nplr", "ViS4mer", "ViS4merConfig", "SelfAttentionBaseline",
    "VARIANTS", "create_model", "list_variants", "variant_config", "param_groups",
]
