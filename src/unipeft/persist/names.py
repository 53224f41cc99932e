"""The file names and format tags of adapter folders, in one place (unipeft's format, HF peft's, the index)."""

#: An adapter folder's config (unipeft's and HF peft's share the name; ``format`` tells them apart).
CONFIG_NAME = "adapter_config.json"
#: An adapter folder's weights (safetensors; nothing is ever unpickled).
WEIGHTS_NAME = "adapter_model.safetensors"
#: The index of a folder holding several adapters in subfolders (:mod:`unipeft.interop.pretrained`).
INDEX_NAME = "unipeft_adapters.json"
#: The ``format`` tag of unipeft's own adapter config, and its version.
FORMAT = "unipeft-adapter"
FORMAT_VERSION = 1

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "INDEX_NAME", "FORMAT", "FORMAT_VERSION"]
