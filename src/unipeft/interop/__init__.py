"""Interoperability with other PEFT libraries' file formats.

Hugging Face peft (``adapter_config.json`` + ``adapter_model.safetensors``), both ways::

    from unipeft.interop import load_hf_adapter, save_hf_adapter
    peft = load_hf_adapter(model, "hf_adapter/")     # an adapter trained with HF peft, as a unipeft adapter
    save_hf_adapter(peft, "for_hf/")                 # PeftModel.from_pretrained(base, "for_hf/") gives the same outputs
"""

from unipeft.interop.hf_peft import (export_hf_adapter, hf_config_to_recipe, load_hf_adapter, read_hf_adapter,
                                     recipe_to_hf_config, save_hf_adapter, supported_peft_types)

__all__ = ["export_hf_adapter", "hf_config_to_recipe", "load_hf_adapter", "read_hf_adapter", "recipe_to_hf_config",
           "save_hf_adapter", "supported_peft_types"]
