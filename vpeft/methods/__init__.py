"""PEFT methods: the method contract, the registry, ``PeftModel`` and the built-in methods."""

from .base import Adapter, ForwardContext, Method, PeftConfig, get_method, list_methods, register_method
from .bitfit import BitFitConfig, DiffFitConfig, LNTuneConfig
from .block_lora import BlockLoraConfig
from .comp_lora import CompLoraConfig
from .dora import DoRAConfig
from .layers import AdapterLayer
from .lora import LoraConfig
from .peft_model import PeftModel, get_peft_model
from .ssf import SSFConfig
from .vpt import VPTConfig

__all__ = ["Adapter", "AdapterLayer", "BitFitConfig", "BlockLoraConfig", "CompLoraConfig", "DiffFitConfig",
           "DoRAConfig", "ForwardContext", "LNTuneConfig", "LoraConfig", "Method", "PeftConfig", "PeftModel",
           "SSFConfig", "VPTConfig", "get_method", "get_peft_model", "list_methods", "register_method"]
