"""kvcompress: KV-cache compression with a C core, for Hugging Face transformers.

>>> import kvcompress as kvc
>>> with kvc.compress(model, kvc.SnapKV(ratio=0.5)) as session:
...     out = model.generate(**inputs, max_new_tokens=64)
>>> print(session.cache.stats())

Importing the package loads neither torch nor transformers; names that need
them are resolved on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ops": ("kvcompress.ops", None),
    "KVCompressError": ("kvcompress.errors", "KVCompressError"),
    "KVCompressValueError": ("kvcompress.errors", "KVCompressValueError"),
    "KVCompressTypeError": ("kvcompress.errors", "KVCompressTypeError"),
    "KVCompressUnsupportedError": ("kvcompress.errors", "KVCompressUnsupportedError"),
    "KVCache": ("kvcompress.cache", "KVCache"),
    "CacheStats": ("kvcompress.cache", "CacheStats"),
    "compress": ("kvcompress.hf", "compress"),
    "enable": ("kvcompress.hf", "enable"),
    "register": ("kvcompress.hf", "register"),
    "CompressionSession": ("kvcompress.hf", "CompressionSession"),
    "load_default_model": ("kvcompress.model", "load_default_model"),
    "load_model": ("kvcompress.model", "load_model"),
    "load_gemma3": ("kvcompress.model", "load_gemma3"),
    "testing": ("kvcompress.testing", None),
    "Method": ("kvcompress.methods", "Method"),
    "StreamingLLM": ("kvcompress.methods", "StreamingLLM"),
    "SnapKV": ("kvcompress.methods", "SnapKV"),
    "PyramidKV": ("kvcompress.methods", "PyramidKV"),
    "AdaKV": ("kvcompress.methods", "AdaKV"),
    "EMS": ("kvcompress.methods", "EMS"),
    "Knorm": ("kvcompress.methods", "Knorm"),
    "LagKV": ("kvcompress.methods", "LagKV"),
    "H2O": ("kvcompress.methods", "H2O"),
    "TOVA": ("kvcompress.methods", "TOVA"),
    "VATP": ("kvcompress.methods", "VATP"),
    "Keyformer": ("kvcompress.methods", "Keyformer"),
    "KIVI": ("kvcompress.methods", "KIVI"),
    "LowBits": ("kvcompress.methods", "LowBits"),
    "MiKV": ("kvcompress.methods", "MiKV"),
    "ZipCache": ("kvcompress.methods", "ZipCache"),
    "Quest": ("kvcompress.methods", "Quest"),
    "TidalDecode": ("kvcompress.methods", "TidalDecode"),
    "MagicPIG": ("kvcompress.methods", "MagicPIG"),
    "MiniCache": ("kvcompress.methods", "MiniCache"),
    "KVSharer": ("kvcompress.methods", "KVSharer"),
    "HeadKV": ("kvcompress.methods", "HeadKV"),
    "RazorAttention": ("kvcompress.methods", "RazorAttention"),
    "KVCrush": ("kvcompress.methods", "KVCrush"),
    "KVMerger": ("kvcompress.methods", "KVMerger"),
    "SCOPE": ("kvcompress.methods", "SCOPE"),
    "HeadProfile": ("kvcompress.heads", "HeadProfile"),
    "profile_heads": ("kvcompress.heads", "profile_heads"),
    "calibrate_kvsharer": ("kvcompress.calibrate", "calibrate_kvsharer"),
    "calibration_ids": ("kvcompress.calibrate", "calibration_ids"),
    "ActQKV": ("kvcompress.methods", "ActQKV"),
    "TaskKV": ("kvcompress.methods", "TaskKV"),
    "DynamicKV": ("kvcompress.methods", "DynamicKV"),
    "SqueezeAttention": ("kvcompress.methods", "SqueezeAttention"),
    "FastGen": ("kvcompress.methods", "FastGen"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'kvcompress' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
