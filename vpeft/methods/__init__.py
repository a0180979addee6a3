"""PEFT methods: the method contract, the registry, ``PeftModel`` and the built-in methods."""

from ._calibration import calibrate
from .adaptformer import AdaptFormerConfig
from .base import Adapter, ForwardContext, Method, PeftConfig, get_method, list_methods, register_method
from .bitfit import BitFitConfig, DiffFitConfig, LNTuneConfig
from .block_lora import BlockLoraConfig
from .cocoop import CoCoOpConfig
from .comp_lora import CompLoraConfig
from .compacter import CompacterConfig
from .coop import CoOpConfig
from .dapt import DAPTConfig
from .dora import DoRAConfig
from .earth_adapter import EarthAdapterConfig
from .idpt import IDPTConfig
from .ivlp import IVLPConfig
from .layers import AdapterLayer
from .lora import LoraConfig
from .lst import LSTConfig
from .maple import MaPLeConfig
from .mask import MaskTuningConfig
from .mosa import MoSAConfig
from .nola import NOLAConfig
from .peft_model import PeftModel, get_peft_model
from .point_peft import PointPEFTConfig
from .promptsrc import PromptSRCConfig
from .spt import SPTConfig
from .ssf import SSFConfig
from .unipt import UniPTConfig
from .vpt import VPTConfig

__all__ = ["AdaptFormerConfig", "Adapter", "AdapterLayer", "BitFitConfig", "BlockLoraConfig", "CoCoOpConfig",
           "CoOpConfig", "CompLoraConfig", "CompacterConfig", "DAPTConfig", "DiffFitConfig", "DoRAConfig",
           "EarthAdapterConfig",
           "ForwardContext", "IDPTConfig", "IVLPConfig", "LNTuneConfig", "LSTConfig", "LoraConfig", "MaPLeConfig",
           "MaskTuningConfig", "Method", "MoSAConfig", "NOLAConfig", "PeftConfig", "PeftModel", "PointPEFTConfig",
           "PromptSRCConfig", "SPTConfig", "SSFConfig", "UniPTConfig", "VPTConfig", "calibrate", "get_method",
           "get_peft_model", "list_methods", "register_method"]
