"""vpeft: parameter-efficient fine-tuning for vision and vision-language models, built on timm and open_clip.

Typical use::

    import vpeft
    model = vpeft.create_backbone("timm:vit_base_patch16_224", pretrained=True, num_classes=37)
    pm = vpeft.get_peft_model(model, [vpeft.LoraConfig(r=8, targets=["q", "v"])], trainable_extra=["head"])
    pm.print_trainable_parameters()
"""

__version__ = "0.1.0"

from .backbones import BackboneSpec, Site, create_backbone, get_spec, list_backbones, register_backbone
from .clip import ClipClassifier, build_zero_shot_classifier
from .methods import (
    Adapter,
    AdapterLayer,
    AdaptFormerConfig,
    BitFitConfig,
    BlockLoraConfig,
    CoCoOpConfig,
    CompacterConfig,
    CompLoraConfig,
    CoOpConfig,
    DAPTConfig,
    DiffFitConfig,
    DoRAConfig,
    EarthAdapterConfig,
    ForwardContext,
    IDPTConfig,
    IVLPConfig,
    LNTuneConfig,
    LoraConfig,
    LSTConfig,
    MaPLeConfig,
    MaskTuningConfig,
    Method,
    MoSAConfig,
    NOLAConfig,
    PeftConfig,
    PeftModel,
    PointPEFTConfig,
    PromptSRCConfig,
    SPTConfig,
    SSFConfig,
    UniPTConfig,
    VPTConfig,
    calibrate,
    get_method,
    get_peft_model,
    list_methods,
    register_method,
)
from .methods.importers import load_official_prompts

__all__ = ["AdaptFormerConfig", "Adapter", "AdapterLayer", "BackboneSpec", "BitFitConfig", "BlockLoraConfig",
           "ClipClassifier", "CoCoOpConfig", "CoOpConfig", "CompLoraConfig", "CompacterConfig", "DAPTConfig",
           "DiffFitConfig",
           "DoRAConfig", "EarthAdapterConfig", "ForwardContext", "IDPTConfig", "IVLPConfig", "LNTuneConfig",
           "LSTConfig", "LoraConfig", "MaPLeConfig", "MaskTuningConfig", "Method", "MoSAConfig", "NOLAConfig",
           "PeftConfig", "PeftModel", "PointPEFTConfig", "PromptSRCConfig", "SPTConfig", "SSFConfig", "Site",
           "UniPTConfig", "VPTConfig", "build_zero_shot_classifier", "calibrate", "create_backbone", "get_method",
           "get_peft_model", "get_spec", "list_backbones", "list_methods", "load_official_prompts",
           "register_backbone", "register_method", "__version__"]
